//! The handover protocol between two endpoints in this process, with real sockets.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;

use super::*;
use crate::identity::testutil::temp_dir;

/// Sends a raw `request` with `version` and returns the first reply.
fn raw_request(dir: &Path, body: &[u8]) -> Option<Message> {
    let name = socket_name(dir).unwrap();
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    socket::connect(
        fd.as_raw_fd(),
        &UnixAddr::new_abstract(name.as_bytes()).unwrap(),
    )
    .unwrap();
    let conn = Conn::new(fd, &name).unwrap();
    socket::send(conn.fd.as_raw_fd(), body, MsgFlags::empty()).unwrap();
    conn.recv().ok().flatten().map(|(m, _)| m)
}

#[test]
fn no_running_agent_means_nothing_to_take_over() {
    let dir = temp_dir("handover-none");
    assert!(!running(dir.path()));
    assert!(take_over(dir.path()).unwrap().is_none());
    assert!(take_over(&dir.path().join("missing")).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_move_with_their_backlog_and_stay_open() {
    let dir = temp_dir("handover-move");
    let (mut successors, task) = Endpoint::bind(dir.path()).unwrap().serve();
    // A second endpoint on the same pin directory is refused: one running agent per node.
    assert!(matches!(
        Endpoint::bind(dir.path()),
        Err(HandoverError::Io { op: "bind", .. })
    ));

    // A probe is no successor.
    assert!(running(dir.path()));
    let pod = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
    // Queued before the handover: must be accepted by the new owner.
    let mut early = TcpStream::connect(pod.local_addr().unwrap()).unwrap();
    early.write_all(b"ping").unwrap();

    let path = dir.path().to_path_buf();
    let new_agent = tokio::task::spawn_blocking(move || take_over(&path));
    let successor = successors.recv().await.unwrap();
    assert_eq!(successor.pid(), std::process::id() as i32);
    successor
        .send_sockets(&[(Role::Pod, pod.as_fd()), (Role::Metrics, metrics.as_fd())])
        .unwrap();
    // The old agent stops accepting: its copies close; the sockets stay open in the new one.
    let (pod_addr, metrics_addr) = (pod.local_addr().unwrap(), metrics.local_addr().unwrap());
    drop((pod, metrics));
    // Counters in several chunks, one cut inside a multi-byte character.
    let counters = format!("a_total{{x=\"{}\"}} 1\n", "é".repeat(20_000));
    successor.released(&counters).unwrap();
    let mut handed = new_agent.await.unwrap().unwrap().unwrap();
    assert_eq!(handed.predecessor, std::process::id() as i32);
    assert_eq!(handed.counters, counters);
    let watch = handed.drain_watch().unwrap();
    let waiting = tokio::task::spawn_blocking(move || watch.wait());
    successor.drained("b_total 2\n").unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), "b_total 2\n");

    assert!(handed.listener(Role::Admin, metrics_addr).is_none());
    let metrics = handed.listener(Role::Metrics, metrics_addr).unwrap();
    assert_eq!(metrics.local_addr().unwrap(), metrics_addr);
    let pods = handed.take(Role::Pod);
    assert_eq!(pods.len(), 1);
    let pod = TcpListener::from(pods.into_iter().next().unwrap());
    assert_eq!(pod.local_addr().unwrap(), pod_addr);
    let (mut accepted, _) = pod.accept().unwrap();
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    // And new connects reach it too.
    let _late = TcpStream::connect(pod_addr).unwrap();
    pod.accept().unwrap();
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_listeners_than_one_message_holds_go_in_several() {
    let dir = temp_dir("handover-many");
    let (mut successors, task) = Endpoint::bind(dir.path()).unwrap().serve();
    // Two messages' worth (at most 200 descriptors each) and a bit.
    let listeners: Vec<TcpListener> = (0..201)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let path = dir.path().to_path_buf();
    let new_agent = tokio::task::spawn_blocking(move || take_over(&path));
    let successor = successors.recv().await.unwrap();
    let sockets: Vec<(Role, BorrowedFd)> =
        listeners.iter().map(|l| (Role::Pod, l.as_fd())).collect();
    successor.send_sockets(&sockets).unwrap();
    successor.released("").unwrap();
    let mut handed = new_agent.await.unwrap().unwrap().unwrap();
    let mut got: Vec<u16> = handed
        .take(Role::Pod)
        .into_iter()
        .map(|fd| TcpListener::from(fd).local_addr().unwrap().port())
        .collect();
    let mut sent: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    got.sort_unstable();
    sent.sort_unstable();
    assert_eq!(got, sent);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_is_refused_and_the_next_successor_still_served() {
    let dir = temp_dir("handover-bad");
    let (mut successors, task) = Endpoint::bind(dir.path()).unwrap().serve();
    let path = dir.path().to_path_buf();
    let replies = tokio::task::spawn_blocking(move || {
        (
            raw_request(&path, br#"{"type":"request","version":2}"#),
            raw_request(&path, b"{not json"),
        )
    })
    .await
    .unwrap();
    match replies.0 {
        Some(Message::Refused { reason }) => {
            assert!(reason.contains("version 2 is not 1"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        replies.1.is_none(),
        "closed without a reply: {:?}",
        replies.1
    );
    assert!(successors.try_recv().is_err(), "neither reached the agent");

    let path = dir.path().to_path_buf();
    let new_agent = tokio::task::spawn_blocking(move || take_over(&path));
    let successor = successors.recv().await.unwrap();
    successor.refuse("draining already");
    match new_agent.await.unwrap() {
        Err(e @ HandoverError::Refused { .. }) => {
            assert!(e.to_string().contains("draining already"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    task.abort();
}
