//! One CONNECT stream as a byte stream (tokio's `AsyncRead` and `AsyncWrite`), on the `h2`
//! crate directly: HTTP/2's flow control is released as bytes are taken, and the stream can
//! be reset with `CONNECT_ERROR` (RFC 9113 8.5), which is how a TCP reset crosses a tunnel.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A CONNECT stream's two halves, what was received and not read yet, and whether this end
/// has ended its half (END_STREAM).
#[derive(Debug)]
pub struct Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    unread: Bytes,
    shut: bool,
    /// A client stream's hold on its pooled tunnel, given back when the stream is dropped.
    _lease: Option<super::Lease>,
}

impl Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            shut: false,
            _lease: None,
        }
    }

    /// The stream holding `lease` until it is dropped.
    pub(super) fn leased(mut self, lease: super::Lease) -> Self {
        self._lease = Some(lease);
        self
    }

    /// Resets the stream with `CONNECT_ERROR`: the far end resets its TCP connection. Nothing
    /// happens to a stream already closed.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
    }
}

/// A stream error as the socket it stands for would report it: any reset before the peer's
/// END_STREAM (one after it reads as the end) cut the exchange short, so the far end's TCP
/// reset (`CONNECT_ERROR`) and a peer that gave up on the stream (`CANCEL`, even `NO_ERROR`)
/// alike are a reset here, never an orderly end.
fn read_error(e: h2::Error) -> io::Error {
    if e.is_reset() {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else {
        io_error(e)
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
                Some(Ok(data)) => self.unread = data,
                Some(Err(e)) => return Poll::Ready(Err(read_error(e))),
            }
        }
        let n = buf.remaining().min(self.unread.len());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        // The window opens again only for bytes taken: what waits here counts against it.
        let _ = self.recv.flow_control().release_capacity(n);
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
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = ready!(self.poll_room(buf.len(), cx))?;
        let data = Bytes::copy_from_slice(&buf[..n]);
        self.send.send_data(data, false).map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued frames are the connection's to write.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shut {
            return Poll::Ready(Ok(()));
        }
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                self.shut = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => self.poll_closed(cx).map(Err),
        }
    }
}

impl Stream {
    /// How many of `want` bytes the peer's window takes now (at least one).
    fn poll_room(&mut self, want: usize, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(want);
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) if n > 0 => Poll::Ready(Ok(n.min(want))),
            // h2 does not announce no capacity (it stays pending); should it, ask again.
            Some(Ok(_)) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Err(e)) => Poll::Ready(Err(io_error(e))),
            // Closed: the peer reset it, or it ended.
            None => self.poll_closed(cx).map(Err),
        }
    }

    /// Why the sending half is closed.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::CONNECT_ERROR) => io::ErrorKind::ConnectionReset.into(),
            Ok(_) => io::ErrorKind::BrokenPipe.into(),
            Err(e) => io_error(e),
        })
    }
}

/// A user connection's first read takes up to this; a read that fills its buffer makes the
/// next one four times larger, up to [`MAX_READ`]. A stream (reads that fill their buffer
/// one after another, the socket never running dry between them) that has carried
/// [`JUMBO_AFTER`] reads up to [`JUMBO_READ`] (as ztunnel's copy grows its buffers): a quarter
/// of the reads, frames and tunnel writes per byte. Small exchanges hold 4 KiB, not the
/// 2 × 64 KiB (zeroed for every connection) of a generic copy, and request/response traffic
/// never holds more than 64 KiB, however much it has carried.
const FIRST_READ: usize = 4 << 10;
const MAX_READ: usize = 64 << 10;
const JUMBO_READ: usize = 256 << 10;
const JUMBO_AFTER: u64 = 10 << 20;

/// The size of a user connection's next read, after one of `size`; `streak`: the reads that
/// filled their buffer since the socket last ran dry (0: this one did not fill), `carried`:
/// bytes sent so far.
fn next_read(size: usize, streak: u32, carried: u64) -> usize {
    if streak == 0 {
        return size.min(MAX_READ);
    }
    let most = if streak >= 2 && carried >= JUMBO_AFTER {
        JUMBO_READ
    } else {
        MAX_READ
    };
    (size * 4).min(most)
}

/// The user-to-stream half of a carry: what was read and not sent yet.
#[derive(Debug)]
struct Up {
    buf: BytesMut,
    next: usize,
    /// Reads that filled their buffer since the socket last ran dry.
    streak: u32,
    unsent: Bytes,
    done: bool,
    bytes: u64,
}

/// The stream-to-user half: the user socket still to be flushed, shut down, or neither.
#[derive(Debug, Default)]
struct Down {
    flush: bool,
    done: bool,
    bytes: u64,
}

impl Stream {
    /// Carries `user` both ways until both halves ended; returns (bytes read from `user` and
    /// sent on the stream, bytes received and written to `user`). What is read from `user`
    /// goes to HTTP/2 as read (no copy); what arrives goes to `user` from HTTP/2's own
    /// buffers, and the window opens as `user` takes it. An error of either side ends the
    /// carry (the caller resets both).
    pub async fn carry<U>(&mut self, user: &mut U) -> io::Result<(u64, u64)>
    where
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let mut up = Up {
            buf: BytesMut::new(),
            next: FIRST_READ,
            streak: 0,
            unsent: Bytes::new(),
            done: false,
            bytes: 0,
        };
        let mut down = Down::default();
        std::future::poll_fn(|cx| {
            let sent = self.poll_up(&mut up, Pin::new(&mut *user), cx)?;
            let received = self.poll_down(&mut down, Pin::new(&mut *user), cx)?;
            if sent.is_pending() || received.is_pending() {
                return Poll::Pending;
            }
            Poll::Ready(Ok((up.bytes, down.bytes)))
        })
        .await
    }

    /// Reads `user` and sends what it read, until its end (passed on as END_STREAM).
    fn poll_up<U: AsyncRead>(
        &mut self,
        up: &mut Up,
        mut user: Pin<&mut U>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !up.done {
            if !up.unsent.is_empty() {
                // One DATA frame per read, as large as the window takes (256 KiB at most, as
                // ztunnel's): each frame is a write of its own to the tunnel.
                let n = ready!(self.poll_room(up.unsent.len(), cx))?;
                let chunk = up.unsent.split_to(n);
                up.bytes += n as u64;
                self.send.send_data(chunk, false).map_err(io_error)?;
                continue;
            }
            up.buf.reserve(up.next);
            let room = up.buf.capacity() - up.buf.len();
            let n = match tokio_util::io::poll_read_buf(user.as_mut(), cx, &mut up.buf) {
                Poll::Ready(read) => read?,
                Poll::Pending => {
                    up.streak = 0;
                    return Poll::Pending;
                }
            };
            if n == 0 {
                ready!(AsyncWrite::poll_shutdown(Pin::new(&mut *self), cx))?;
                up.done = true;
            } else {
                up.streak = if n == room { up.streak + 1 } else { 0 };
                up.next = next_read(up.next, up.streak, up.bytes);
                up.unsent = up.buf.split().freeze();
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what arrives to `user`, until the stream's end (passed on as a shutdown).
    fn poll_down<U: AsyncWrite>(
        &mut self,
        down: &mut Down,
        mut user: Pin<&mut U>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !down.done {
            if !self.unread.is_empty() {
                let n = ready!(user.as_mut().poll_write(cx, &self.unread))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.unread.advance(n);
                down.bytes += n as u64;
                down.flush = true;
                let _ = self.recv.flow_control().release_capacity(n);
                continue;
            }
            if down.flush {
                ready!(user.as_mut().poll_flush(cx))?;
                down.flush = false;
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.unread = data,
                Some(Err(e)) => return Poll::Ready(Err(read_error(e))),
                None => {
                    ready!(user.as_mut().poll_shutdown(cx))?;
                    down.done = true;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A CONNECT stream over `io`, answered.
    async fn connect_stream(io: tokio::io::DuplexStream) -> Stream {
        let (mut sender, conn) = h2::client::handshake(io).await.expect("client");
        tokio::spawn(conn);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .expect("request");
        let (response, send) = sender.send_request(request, false).expect("send");
        let response = response.await.expect("response");
        Stream::new(send, response.into_body())
    }

    /// A stream whose server answers 200 and, once the client wrote to it, sends `data` and
    /// resets it with `reason`.
    async fn reset_by_peer(data: &'static [u8], reason: Reason) -> Stream {
        let (client_io, server_io) = tokio::io::duplex(64 << 10);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.expect("server");
            let (request, mut respond) = conn.accept().await.expect("stream").expect("ok");
            let ok = http::Response::builder()
                .status(200)
                .body(())
                .expect("response");
            let mut send = respond.send_response(ok, false).expect("send");
            tokio::spawn(async move {
                let _ = request.into_body().data().await;
                send.send_data(Bytes::from_static(data), false)
                    .expect("data");
                send.send_reset(reason);
            });
            while conn.accept().await.is_some() {}
        });
        let mut stream = connect_stream(client_io).await;
        stream.write_all(b"go").await.expect("write");
        stream
    }

    /// A user socket offering `left` bytes, as many as each read has room for, that records
    /// every read's room; what it is written is dropped.
    struct Offered {
        left: usize,
        rooms: Vec<usize>,
        /// Runs dry (one Pending) after each this many bytes: request/response traffic.
        pause_every: Option<usize>,
        since_pause: usize,
    }

    impl AsyncRead for Offered {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(every) = self.pause_every
                && self.since_pause >= every
            {
                self.since_pause = 0;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.rooms.push(buf.remaining());
            let until_pause = self
                .pause_every
                .map_or(usize::MAX, |e| e - self.since_pause);
            let n = buf.remaining().min(self.left).min(until_pause);
            self.since_pause += n;
            buf.initialize_unfilled_to(n).fill(7);
            buf.advance(n);
            self.left -= n;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Offered {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Carries `user` to an HTTP/2 peer with weft's frame size and windows: the largest
    /// DATA frame the peer received.
    async fn carry_to_peer(user: &mut Offered) -> usize {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let frames = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .max_frame_size(1 << 20)
                .initial_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .handshake(server_io)
                .await
                .expect("server");
            let (request, mut respond) = conn.accept().await.expect("stream").expect("ok");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let ok = http::Response::builder().status(200).body(()).expect("200");
            let mut send = respond.send_response(ok, false).expect("send");
            let mut body = request.into_body();
            let mut largest = 0;
            while let Some(data) = body.data().await {
                let data = data.expect("data");
                largest = largest.max(data.len());
                let _ = body.flow_control().release_capacity(data.len());
            }
            send.send_data(Bytes::new(), true).expect("end");
            largest
        });
        let mut stream = connect_stream(client_io).await;
        let total = user.left as u64;
        let (up, _) = stream.carry(user).await.expect("carried");
        assert_eq!(up, total);
        frames.await.expect("server")
    }

    fn offered(left: usize, pause_every: Option<usize>) -> Offered {
        Offered {
            left,
            rooms: Vec::new(),
            pause_every,
            since_pause: 0,
        }
    }

    /// A carry of 20 MiB from a socket that always has more: reads grow from 4 KiB, stay at
    /// most 64 KiB for the first 10 MiB, then take 256 KiB, each sent whole as one DATA
    /// frame.
    #[tokio::test]
    async fn a_long_stream_reads_256_kib_after_10_mib_and_sends_each_as_one_frame() {
        let mut user = offered(20 << 20, None);
        let largest_frame = carry_to_peer(&mut user).await;
        assert_eq!(user.rooms.first(), Some(&FIRST_READ));
        let mut offered = 0;
        for &room in &user.rooms {
            if offered < JUMBO_AFTER as usize {
                assert!(room <= MAX_READ, "{room} after {offered} bytes");
            }
            offered += room;
        }
        assert!(
            user.rooms.iter().any(|&r| r >= JUMBO_READ),
            "{:?}",
            user.rooms
        );
        assert_eq!(largest_frame, JUMBO_READ);
    }

    /// 20 MiB of 64 KiB requests, the socket running dry after each: reads never pass
    /// 64 KiB.
    #[tokio::test]
    async fn request_response_traffic_never_reads_more_than_64_kib() {
        let mut user = offered(20 << 20, Some(64 << 10));
        carry_to_peer(&mut user).await;
        let largest = user.rooms.iter().max().copied();
        assert_eq!(largest, Some(MAX_READ));
    }

    /// Reads grow four-fold while they fill their buffer: to 64 KiB, and to 256 KiB only
    /// for a stream (a second full read in a row) that has carried 10 MiB; a read that did
    /// not fill keeps its size, or goes back to 64 KiB from 256.
    #[test]
    fn reads_grow_to_64_kib_and_past_it_only_on_a_long_stream() {
        let mut sizes = vec![FIRST_READ];
        for streak in 1..4 {
            sizes.push(next_read(*sizes.last().expect("a size"), streak, 1 << 20));
        }
        assert_eq!(sizes, [4 << 10, 16 << 10, 64 << 10, 64 << 10]);
        assert_eq!(next_read(64 << 10, 5, (10 << 20) - 1), 64 << 10);
        assert_eq!(next_read(64 << 10, 2, 10 << 20), 256 << 10);
        assert_eq!(
            next_read(64 << 10, 1, 1 << 30),
            64 << 10,
            "a full read after a wait"
        );
        assert_eq!(next_read(256 << 10, 9, 1 << 30), 256 << 10);
        assert_eq!(next_read(16 << 10, 0, 1 << 30), 16 << 10);
        assert_eq!(next_read(256 << 10, 0, 1 << 30), 64 << 10);
    }

    /// A peer's reset before its END_STREAM cut the exchange short: whatever the reason, it
    /// reads as a reset (bytes not read yet are dropped, as TCP's reset drops them), never as
    /// an orderly end.
    #[tokio::test]
    async fn a_reset_before_the_end_reads_as_a_reset() {
        for reason in [Reason::CONNECT_ERROR, Reason::CANCEL, Reason::NO_ERROR] {
            let mut stream = reset_by_peer(b"partial", reason).await;
            let mut read = Vec::new();
            let end = stream.read_to_end(&mut read).await.map_err(|e| e.kind());
            assert_eq!(end, Err(io::ErrorKind::ConnectionReset), "{reason:?}");
        }
    }
}
