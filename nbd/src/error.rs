//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// What went wrong while serving a connection or setting up a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket operation failed (the peer went away, for instance).
    #[error("I/O error while {op}")]
    Io {
        /// What the server was doing.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The client broke the protocol; its connection is closed.
    #[error("protocol violation by the client: {what}")]
    Protocol {
        /// What was wrong.
        what: String,
    },
    /// The client asked for an export this server does not have (`NBD_OPT_EXPORT_NAME`).
    #[error("no export named {name:?}")]
    UnknownExport {
        /// The name the client sent.
        name: String,
    },
    /// An export name longer than 4096 bytes or containing NUL (proto.md "Conventions").
    #[error("invalid export name {name:?}")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// The server already has its maximum number of connections.
    #[error("connection refused: {limit} clients already connected")]
    TooManyClients {
        /// The limit.
        limit: usize,
    },
    /// The server broke the protocol (bad magic, a reply too long or for a request never
    /// made, a chunk outside its request, ...); the connection is dropped.
    #[error("protocol violation by the server: {what}")]
    BadServer {
        /// What was wrong.
        what: String,
    },
    /// The server answered a request or option with an error. Its message is shown quoted,
    /// with control characters escaped: it is the server's text, not ours.
    #[error("the server refused {op}: {message:?} (error {code})")]
    Refused {
        /// What was asked.
        op: String,
        /// The NBD error value or option reply type.
        code: u32,
        /// The server's message, if any.
        message: String,
    },
    /// An `nbd://` URL that does not parse.
    #[error("invalid NBD URL {url:?}: {why}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The copy-on-write overlay was made for another backup point or size; attaching it
    /// would mix two disks.
    #[error("overlay {} belongs to {recorded}, not to {wanted}", path.display())]
    OverlayMismatch {
        /// The overlay file.
        path: PathBuf,
        /// What the overlay records it belongs to.
        recorded: String,
        /// What it was asked to cover.
        wanted: String,
    },
    /// The overlay file is not a Strata overlay, or is damaged.
    #[error("overlay {} is unusable: {what}", path.display())]
    OverlayCorrupt {
        /// The overlay file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Another process has the overlay open.
    #[error("overlay {} is in use by another process", path.display())]
    OverlayBusy {
        /// The overlay file.
        path: PathBuf,
    },
    /// Writing the overlay failed while a connection ended.
    #[error("overlay: {what}")]
    Overlay {
        /// What failed.
        what: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { op, source }
    }

    pub(crate) fn bad_server(what: impl Into<String>) -> Self {
        Self::BadServer { what: what.into() }
    }

    pub(crate) fn protocol(what: impl Into<String>) -> Self {
        Self::Protocol { what: what.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn a_servers_message_is_shown_quoted_with_control_characters_escaped() {
        let err = Error::Refused {
            op: "read".into(),
            code: 5,
            message: "x\r\u{1b}[2KOK".into(),
        };
        assert_eq!(
            err.to_string(),
            r#"the server refused read: "x\r\u{1b}[2KOK" (error 5)"#
        );
    }
}
