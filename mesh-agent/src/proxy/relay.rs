//! Bidirectional byte relay with half-close.
//!
//! When one side finishes sending (EOF), the relay shuts down the write half towards the other
//! side and keeps copying the opposite direction until it finishes too, so request/response
//! protocols that half-close (`shutdown(SHUT_WR)`) work through the proxy.
use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer per direction. Large enough for bulk transfer without a copy per small segment.
const BUF: usize = 64 * 1024;

/// Bytes moved by a finished relay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// From the downstream client to the upstream server.
    pub client_to_server: u64,
    /// From the upstream server back to the client.
    pub server_to_client: u64,
}

pub async fn relay<C, S>(client: &mut C, server: &mut S) -> std::io::Result<Transferred>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (up, down) = tokio::io::copy_bidirectional_with_sizes(client, server, BUF, BUF).await?;
    Ok(Transferred {
        client_to_server: up,
        server_to_client: down,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_is_forwarded_and_the_other_direction_keeps_flowing() {
        let (mut app, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_server, mut upstream) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut proxy_client, &mut proxy_server).await });

        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "upstream sees the request and then EOF");
        upstream.write_all(b"response after EOF").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response after EOF");
        let t = relay.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                client_to_server: 7,
                server_to_client: 18
            }
        );
    }
}
