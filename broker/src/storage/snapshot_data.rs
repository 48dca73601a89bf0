//! The bytes of a snapshot as openraft handles them: the hot state's payload, put in the
//! format the cluster reads and followed by the archive only when the bytes are first read or
//! sought (to be sent). openraft asks for the current snapshot at every start for its metadata
//! alone; that costs neither.

use std::io::{self, Cursor, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::archive::Archive;
use super::state_machine::ARCHIVE_CHUNK;
use super::StoreError;

pub struct SnapshotData {
    bytes: Cursor<Vec<u8>>,
    /// Before the first read or seek: the store format to send the payload in, and the archive
    /// to append in chunks.
    to_send: Option<(u32, Archive)>,
}

impl SnapshotData {
    /// Bytes as they are (a snapshot being received, or one complete already).
    pub fn new(bytes: Vec<u8>) -> SnapshotData {
        SnapshotData { bytes: Cursor::new(bytes), to_send: None }
    }

    /// A stored payload, sent in store format `format` and followed by its archive when the
    /// bytes are first needed.
    pub(crate) fn to_send(payload: Vec<u8>, format: u32, archive: Archive) -> SnapshotData {
        SnapshotData { bytes: Cursor::new(payload), to_send: Some((format, archive)) }
    }

    fn complete(&mut self) -> io::Result<()> {
        if let Some((format, archive)) = self.to_send.take() {
            let mut bytes = super::state_machine::transfer_payload(self.bytes.get_ref(), format).map_err(io::Error::other)?;
            append_archive(&archive, &mut bytes).map_err(io::Error::other)?;
            self.bytes = Cursor::new(bytes);
        }
        Ok(())
    }

    /// The whole bytes.
    pub fn into_bytes(mut self) -> io::Result<Vec<u8>> {
        self.complete()?;
        Ok(self.bytes.into_inner())
    }
}

/// Appends the archive, in chunks of [`ARCHIVE_CHUNK`] pairs, to a snapshot's payload bytes.
pub(crate) fn append_archive(archive: &Archive, bytes: &mut Vec<u8>) -> Result<(), StoreError> {
    archive.chunks(ARCHIVE_CHUNK, |chunk| {
        postcard::to_io(&chunk, &mut *bytes)?;
        Ok(())
    })
}

impl AsyncRead for SnapshotData {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.complete()?;
        Pin::new(&mut self.bytes).poll_read(cx, buf)
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        self.complete()?;
        Pin::new(&mut self.bytes).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.bytes).poll_complete(cx)
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.complete()?;
        Pin::new(&mut self.bytes).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.bytes).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.bytes).poll_shutdown(cx)
    }
}
