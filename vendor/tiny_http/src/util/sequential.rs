use std::io::Result as IoResult;
use std::io::{BufRead, Read};

// keyrack patch: each request makes two of these channels and sends one message on each.
// `sync_channel(1)` holds its one message in a slot allocated with the channel; `channel()`
// allocated a zeroed block of 31 slots on the first send (about 3 KiB for a reader: a
// calloc and its memset on every request, 4,000 instructions of a 45,000-instruction
// /healthz under callgrind). With one message per channel, a send never blocks either way.
use std::sync::mpsc::sync_channel;
use std::sync::mpsc::{Receiver, SyncSender as Sender};

use std::mem;

pub struct SequentialReaderBuilder<R>
where
    R: Read + Send,
{
    inner: SequentialReaderBuilderInner<R>,
}

enum SequentialReaderBuilderInner<R>
where
    R: Read + Send,
{
    First(R),
    NotFirst(Receiver<R>),
}

pub struct SequentialReader<R>
where
    R: Read + Send,
{
    inner: SequentialReaderInner<R>,
    next: Sender<R>,
}

enum SequentialReaderInner<R>
where
    R: Read + Send,
{
    MyTurn(R),
    Waiting(Receiver<R>),
    Empty,
}

impl<R: Read + Send> SequentialReaderBuilder<R> {
    pub fn new(reader: R) -> SequentialReaderBuilder<R> {
        SequentialReaderBuilder {
            inner: SequentialReaderBuilderInner::First(reader),
        }
    }
}

impl<R: Read + Send> Iterator for SequentialReaderBuilder<R> {
    type Item = SequentialReader<R>;

    fn next(&mut self) -> Option<SequentialReader<R>> {
        let (tx, rx) = sync_channel(1);

        let inner = mem::replace(&mut self.inner, SequentialReaderBuilderInner::NotFirst(rx));

        match inner {
            SequentialReaderBuilderInner::First(reader) => Some(SequentialReader {
                inner: SequentialReaderInner::MyTurn(reader),
                next: tx,
            }),

            SequentialReaderBuilderInner::NotFirst(previous) => Some(SequentialReader {
                inner: SequentialReaderInner::Waiting(previous),
                next: tx,
            }),
        }
    }
}

impl<R: Read + Send> SequentialReader<R> {
    /// keyrack patch: blocks until the previous reader is done, without reading.
    /// A reader gone before its turn is met again at the next read, as an error.
    pub fn wait_turn(&mut self) {
        let _ = self.take_turn();
    }
}

impl<R: Read + Send> SequentialReader<std::io::BufReader<R>> {
    /// keyrack patch: whether bytes of the stream are buffered here already (a request
    /// pipelined behind the previous one), without reading or waiting.
    pub fn has_buffered(&self) -> bool {
        matches!(self.inner, SequentialReaderInner::MyTurn(ref r) if !r.buffer().is_empty())
    }
}

impl<R: Read + Send> SequentialReader<R> {
    /// Waits for the reader before this one to finish, then holds the stream.
    fn take_turn(&mut self) -> IoResult<&mut R> {
        if let SequentialReaderInner::Waiting(ref mut recv) = self.inner {
            let reader = recv.recv().map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "previous reader gone")
            })?;
            self.inner = SequentialReaderInner::MyTurn(reader);
        }
        match self.inner {
            SequentialReaderInner::MyTurn(ref mut reader) => Ok(reader),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "reader already handed on",
            )),
        }
    }
}

/// keyrack patch: the connection reads a request head from the buffer directly (`fill_buf`,
/// then `consume` of the bytes up to the head's end) instead of one `read` of one byte at a
/// time through this reader and the `BufReader` under it (about 90 instructions a byte).
impl<R: BufRead + Send> BufRead for SequentialReader<R> {
    fn fill_buf(&mut self) -> IoResult<&[u8]> {
        self.take_turn()?.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        if let SequentialReaderInner::MyTurn(ref mut reader) = self.inner {
            reader.consume(amt);
        }
    }
}

impl<R: Read + Send> Read for SequentialReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        // keyrack patch: the original unwrapped a closed channel and had an unreachable!()
        self.take_turn()?.read(buf)
    }
}

impl<R> Drop for SequentialReader<R>
where
    R: Read + Send,
{
    fn drop(&mut self) {
        let inner = mem::replace(&mut self.inner, SequentialReaderInner::Empty);

        match inner {
            SequentialReaderInner::MyTurn(reader) => {
                self.next.send(reader).ok();
            }
            SequentialReaderInner::Waiting(recv) => {
                // keyrack patch: the original unwrapped a closed channel here
                if let Ok(reader) = recv.recv() {
                    self.next.send(reader).ok();
                }
            }
            SequentialReaderInner::Empty => (),
        }
    }
}
