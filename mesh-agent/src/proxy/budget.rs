//! Future-size budgets. A connection's task holds its handler's future for as long as it lives,
//! and every step boxes its own future; a change that makes one larger makes every connection
//! larger with it. In a debug build (every end-to-end test) each is checked against its budget
//! here, so such a change fails the tests instead of slipping by; raise a budget only knowingly.
//! `MESH_PRINT_FUTURE_SIZES=1` prints the sizes.
use std::future::Future;
use std::pin::Pin;

/// A step's future, boxed: steps are composed at run time, and a box keeps each connection's
/// task as small as its own state.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Boxes a step's future after checking its size against the step's budget.
pub fn boxed<F>(what: &'static str, future: F) -> BoxFuture<F::Output>
where
    F: Future + Send + 'static,
{
    assert_future_size(what, &future);
    Box::pin(future)
}

/// The budget of each connection task and step, in bytes, in a debug build. Measured (debug,
/// `proxy::tests::connection_futures_stay_within_their_budgets`): outbound 3,056 (with what the
/// resolve step keeps to report an endpoint's health and retry once: about 100 bytes), inbound
/// HBONE 7,496 (TLS and HTTP/2 state), one CONNECT stream 2,224 (at a waypoint 4,624, with
/// protocol detection), inbound plaintext 1,680, connect 4,736 (freed once connected), connect to
/// the application 808. A step's box lives only while
/// the step runs; the relay's state reuses the handler's space after it.
#[cfg(debug_assertions)]
fn budget(what: &str) -> usize {
    match what {
        "outbound" | "inbound stream" => 3 * 1024,
        "waypoint stream" => 5 * 1024,
        "inbound HBONE" => 8 * 1024,
        "inbound plaintext" => 2 * 1024,
        "connect" => 5 * 1024,
        _ => 1024,
    }
}

/// Checked in debug builds only.
pub fn assert_future_size<F>(what: &str, _future: &F) {
    #[cfg(debug_assertions)]
    {
        let size = std::mem::size_of::<F>();
        if std::env::var_os("MESH_PRINT_FUTURE_SIZES").is_some() {
            eprintln!("future size: {what} {size}");
        }
        let budget = budget(what);
        assert!(
            size <= budget,
            "the {what} future is {size} bytes, over its budget of {budget}"
        );
    }
    #[cfg(not(debug_assertions))]
    let _ = what;
}
