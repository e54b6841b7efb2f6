//! One CONNECT stream as a byte stream (tokio's `AsyncRead` and `AsyncWrite`), on the `h2`
//! crate directly: HTTP/2's flow control is released as bytes are taken, and the stream can
//! be reset with `CONNECT_ERROR` (RFC 9113 8.5), which is how a TCP reset crosses a tunnel.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use h2::{Reason, RecvStream, SendStream};
use hyper::body::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A CONNECT stream's two halves, and what was received and not read yet.
#[derive(Debug)]
pub struct Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    unread: Bytes,
}

impl Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
        }
    }

    /// Resets the stream with `CONNECT_ERROR`: the far end resets its TCP connection. Nothing
    /// happens to a stream already closed.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
    }
}

/// A stream error as the socket it stands for would report it: `CONNECT_ERROR` is the far
/// end's TCP reset; `NO_ERROR` and `CANCEL` (a peer that dropped a stream it had finished, as
/// hyper does) end it.
fn read_error(e: h2::Error) -> Option<io::Error> {
    match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL) => None,
        Some(Reason::CONNECT_ERROR) => Some(io::Error::new(io::ErrorKind::ConnectionReset, e)),
        _ => Some(io_error(e)),
    }
}

fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into())
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    // The window opens again as soon as the bytes are ours: one frame at
                    // most waits here.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.unread = data;
                }
                Some(Err(e)) => {
                    return Poll::Ready(read_error(e).map_or(Ok(()), Err));
                }
            }
        }
        let n = buf.remaining().min(self.unread.len());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) if n > 0 => {
                let n = n.min(buf.len());
                let data = Bytes::copy_from_slice(&buf[..n]);
                self.send.send_data(data, false).map_err(io_error)?;
                Poll::Ready(Ok(n))
            }
            Some(Ok(_)) => {
                // Capacity announced and taken back before it was ours: ask again.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Err(e)) => Poll::Ready(Err(io_error(e))),
            // Closed: the peer reset it, or it ended.
            None => self.poll_closed(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued frames are the connection's to write.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => self.poll_closed(cx).map(Err),
        }
    }
}

impl Stream {
    /// Why the sending half is closed.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::CONNECT_ERROR) => io::ErrorKind::ConnectionReset.into(),
            Ok(_) => io::ErrorKind::BrokenPipe.into(),
            Err(e) => io_error(e),
        })
    }
}
