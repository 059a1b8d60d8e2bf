//! Closes connections that carry no request for too long.
//!
//! Why: actix-web bounds a connection's first request head and an idle kept-alive connection
//! (5 s each), but once a later request's first byte arrives its keep-alive timer is cleared
//! and no head timer is set: a client that sends `G` after a response and nothing more holds
//! the connection, and a file descriptor, forever. Here every connection is watched from its
//! accept (`on_connect`), a request in progress counts as activity (see
//! [`super::keep_body_until_sent`]), and a sweeper on each HTTP worker shuts down the socket of
//! one that has had no request in progress for `server.stalled_connection_secs` (far beyond
//! actix's own timers, so only a stalled connection is ever left for it). The socket is shut
//! down through a duplicate of its descriptor, which stays valid however the connection ends.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

/// One connection's activity, shared by its extension, its requests and the sweeper.
#[derive(Debug)]
pub struct Watched {
    /// A duplicate of the connection's socket, to shut it down with.
    socket: std::net::TcpStream,
    /// Requests begun and not yet answered to the end.
    in_progress: Cell<u32>,
    /// When the last request ended (or the connection was accepted).
    quiet_since: Cell<Instant>,
    /// Shut down already.
    shut: Cell<bool>,
}

/// A request in progress on a watched connection; ending it (dropped with the response body)
/// counts as activity.
#[derive(Debug)]
pub struct InProgress(Rc<Watched>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.in_progress.set(self.0.in_progress.get().saturating_sub(1));
        self.0.quiet_since.set(Instant::now());
    }
}

/// The connection extension (see [`watch`]).
#[derive(Debug, Clone)]
pub struct ConnectionWatch(Rc<Watched>);

impl ConnectionWatch {
    /// Marks a request as begun until the returned guard is dropped.
    pub fn begin_request(&self) -> InProgress {
        self.0.in_progress.set(self.0.in_progress.get().saturating_add(1));
        InProgress(Rc::clone(&self.0))
    }

    /// Whether the client has closed its end, or the connection broke: a response written now
    /// would reach no one. (actix-web goes on running a handler whose client left.) Bytes still
    /// unread, a pipelined request, say, mean it has not.
    pub fn peer_closed(&self) -> bool {
        peer_closed(&self.0.socket)
    }
}

#[cfg(unix)]
fn peer_closed(socket: &std::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: `recv` writes at most one byte into `byte`, which outlives the call; MSG_DONTWAIT
    // keeps it from blocking whatever the descriptor's own mode.
    let read =
        unsafe { libc::recv(socket.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    match read {
        0 => true,
        1.. => false,
        _ => !matches!(
            std::io::Error::last_os_error().kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

#[cfg(not(unix))]
fn peer_closed(_socket: &std::net::TcpStream) -> bool {
    false
}

/// How often, at most, a worker logs that it could not watch a connection.
const UNWATCHED_LOG_EVERY: Duration = Duration::from_secs(60);

thread_local! {
    /// When this worker last logged a connection it could not watch.
    static UNWATCHED_LOGGED: Cell<Option<Instant>> = const { Cell::new(None) };
    /// This worker's watched connections, and whether its sweeper runs.
    static WATCHED: RefCell<(Vec<Weak<Watched>>, bool)> = const { RefCell::new((Vec::new(), false)) };
}

/// `HttpServer::on_connect`: watches a plain TCP connection, sweeping this worker's every
/// `limit / 4` for those quiet for `limit`.
pub fn watch(connection: &dyn Any, extensions: &mut actix_web::dev::Extensions, limit: Duration) {
    let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() else { return };
    let socket = match duplicate(stream) {
        Ok(socket) => socket,
        Err(error) if error.kind() == std::io::ErrorKind::Unsupported => return,
        Err(error) => {
            // Once a minute per worker at most: out of descriptors, every connection fails so.
            let due = UNWATCHED_LOGGED.with(|logged| {
                let due = logged.get().is_none_or(|at| at.elapsed() >= UNWATCHED_LOG_EVERY);
                if due {
                    logged.set(Some(Instant::now()));
                }
                due
            });
            if due {
                tracing::warn!(%error, "Cannot watch a connection for stalls (no descriptor to spare); see the open file limit (ulimit -n).");
            }
            return;
        }
    };
    let watched = Rc::new(Watched {
        socket,
        in_progress: Cell::new(0),
        quiet_since: Cell::new(Instant::now()),
        shut: Cell::new(false),
    });
    let start_sweeper = WATCHED.with(|cell| {
        let (watched_here, sweeping) = &mut *cell.borrow_mut();
        watched_here.push(Rc::downgrade(&watched));
        !std::mem::replace(sweeping, true)
    });
    if start_sweeper {
        actix_web::rt::spawn(sweep(limit));
    }
    extensions.insert(ConnectionWatch(watched));
}

/// Raises the soft limit on open files to the hard one (at most 2^20), as each connection
/// takes two descriptors (its socket and the duplicate watched here): at a usual soft limit of
/// 1024, accepts would fail at about 500 connections. Returns the limit now in force, if known.
/// Linux only (what Yizhan is built for; macOS, say, refuses a soft limit above its own cap).
#[cfg(target_os = "linux")]
pub fn raise_open_file_limit() -> Option<u64> {
    const MOST: libc::rlim_t = 1 << 20;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let wanted = limit.rlim_max.min(MOST);
    if limit.rlim_cur >= wanted {
        return Some(limit.rlim_cur);
    }
    let raised = libc::rlimit { rlim_cur: wanted, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, soft = limit.rlim_cur, "Cannot raise the open file limit; each connection takes two.");
        return Some(limit.rlim_cur);
    }
    tracing::debug!(from = limit.rlim_cur, to = wanted, "Open file limit raised.");
    Some(wanted)
}

#[cfg(not(target_os = "linux"))]
pub fn raise_open_file_limit() -> Option<u64> {
    None
}

#[cfg(unix)]
fn duplicate(stream: &actix_web::rt::net::TcpStream) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::AsFd;
    Ok(std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?))
}

/// Elsewhere connections are not watched (Yizhan is built for Linux).
#[cfg(not(unix))]
fn duplicate(_: &actix_web::rt::net::TcpStream) -> std::io::Result<std::net::TcpStream> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Shuts down, every `limit / 4`, this worker's connections quiet for `limit`, and forgets the
/// ones that ended.
async fn sweep(limit: Duration) {
    let mut every = actix_web::rt::time::interval((limit / 4).max(Duration::from_millis(10)));
    loop {
        every.tick().await;
        WATCHED.with(|cell| {
            let (watched_here, _) = &mut *cell.borrow_mut();
            watched_here.retain(|weak| {
                let Some(watched) = weak.upgrade() else { return false };
                if watched.in_progress.get() == 0 && !watched.shut.get() && watched.quiet_since.get().elapsed() >= limit
                {
                    watched.shut.set(true);
                    // The connection then reads its end and closes; an error only means it is
                    // gone already.
                    let _ = watched.socket.shutdown(std::net::Shutdown::Both);
                    tracing::debug!("Closed a connection that carried no request for too long.");
                }
                true
            });
        });
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn limit() -> libc::rlimit {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as in `raise_open_file_limit`.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        limit
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        let before = limit();
        let wanted = before.rlim_max.min(1 << 20);
        // One below: the other tests of this process, running meanwhile, lose nothing by it.
        let lowered =
            libc::rlimit { rlim_cur: wanted.saturating_sub(1).min(before.rlim_cur), rlim_max: before.rlim_max };
        // SAFETY: as in `raise_open_file_limit`.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        assert_eq!(raise_open_file_limit(), Some(wanted));
        assert_eq!(limit().rlim_cur, wanted);
    }
}
