use super::*;

#[test]
fn the_first_bytes_tell_http1_http2_or_opaque() {
    let cases: &[(&[u8], Option<Detected>)] = &[
        (b"", None),
        (b"G", None),
        (b"GET", None),
        (b"GET /", None),
        (b"GET /path?q=1 HTT", None),
        (b"GET /path?q=1 HTTP/1.1\r", None),
        (
            b"GET /path?q=1 HTTP/1.1\r\nHost: a\r\n",
            Some(Detected::Http1),
        ),
        (b"POST / HTTP/1.0\r\n", Some(Detected::Http1)),
        (b"GET / HTTP/1.1\n", Some(Detected::Http1)),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Detected::Http2)),
        (b"PRI * HTTP/2.0\r\n", None),
        (
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04",
            Some(Detected::Http2),
        ),
        // TLS, SSH, a MySQL-ish binary greeting, a broken request line.
        (b"\x16\x03\x01\x02\x00", Some(Detected::Opaque)),
        (b"SSH-2.0-OpenSSH_9.6\r\n", Some(Detected::Opaque)),
        (b"\x00\x00\x00\x0a", Some(Detected::Opaque)),
        (b"GET / HTTP/2.0\r\n", Some(Detected::Opaque)),
        (b"GET  / HTTP/1.1\r\n", Some(Detected::Opaque)),
        (b"GET / FTP", Some(Detected::Opaque)),
        (b"HELLO\r\n", Some(Detected::Opaque)),
    ];
    for (bytes, want) in cases {
        assert_eq!(
            classify(bytes),
            *want,
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    let long = format!("GET /{} ", "a".repeat(MAX_REQUEST_LINE));
    assert_eq!(classify(long.as_bytes()), Some(Detected::Opaque));
}

#[test]
fn a_declared_port_protocol_needs_no_sniffing() {
    assert_eq!(declared(PortProtocol::Http), Some(Detected::Http1));
    assert_eq!(declared(PortProtocol::Http2), Some(Detected::Http2));
    assert_eq!(declared(PortProtocol::Tcp), Some(Detected::Opaque));
    assert_eq!(declared(PortProtocol::Unspecified), None);
}

#[tokio::test]
async fn sniffing_reads_until_it_knows_and_the_bytes_are_replayed() {
    let (mut client, server) = tokio::io::duplex(64);
    let mut server = server;
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GET /a HT").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .write_all(b"TP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        client
    });
    let (prefix, verdict) = sniff(&mut server, Duration::from_secs(5)).await.unwrap();
    assert_eq!(verdict, Detected::Http1);
    let _client = writer.await.unwrap();
    let mut replay = Rewind::new(prefix, server);
    let mut line = vec![0u8; 16];
    replay.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"GET /a HTTP/1.1\r");
}

#[tokio::test]
async fn a_silent_client_is_opaque_after_the_timeout() {
    let (_client, mut server) = tokio::io::duplex(64);
    let started = tokio::time::Instant::now();
    let (prefix, verdict) = sniff(&mut server, Duration::from_millis(50)).await.unwrap();
    assert_eq!((prefix.len(), verdict), (0, Detected::Opaque));
    assert!(started.elapsed() >= Duration::from_millis(50));
}

#[tokio::test]
async fn a_declared_http_port_tells_h2c_from_http1_by_the_preface() {
    use tokio::io::AsyncWriteExt;
    for (sent, expected) in [
        (
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"[..],
            Detected::Http2,
        ),
        (&b"PRI * HTTP/1.1\r\n"[..], Detected::Http1),
        (&b"GET / HTTP/1.1\r\n"[..], Detected::Http1),
        // Not HTTP at all: still HTTP/1 on a declared port (hyper answers 400).
        (&b"\x16\x03\x01"[..], Detected::Http1),
    ] {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(sent).await.unwrap();
        let (prefix, verdict) = sniff_http_version(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(verdict, expected, "{sent:?}");
        assert!(sent.starts_with(&prefix), "{sent:?}: {prefix:?}");
    }
    // Silent, or a part of the preface and then silence: HTTP/1 after the timeout.
    let (mut client, mut server) = tokio::io::duplex(64);
    client.write_all(b"PRI * HT").await.unwrap();
    let (prefix, verdict) = sniff_http_version(&mut server, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!((&prefix[..], verdict), (&b"PRI * HT"[..], Detected::Http1));
}
