//! The bytes of a snapshot as openraft handles them: the hot state's payload, with the archive
//! appended only when the bytes are first read or sought (to be sent). openraft asks for the
//! current snapshot at every start for its metadata alone; that costs no archive read.

use std::io::{self, Cursor, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::archive::Archive;
use super::state_machine::ARCHIVE_CHUNK;
use super::StoreError;

pub struct SnapshotData {
    bytes: Cursor<Vec<u8>>,
    /// Appended, in chunks, before the first read or seek.
    archive: Option<Archive>,
}

impl SnapshotData {
    /// Bytes as they are (a snapshot being received, or one complete already).
    pub fn new(bytes: Vec<u8>) -> SnapshotData {
        SnapshotData { bytes: Cursor::new(bytes), archive: None }
    }

    /// A stored payload whose archive is appended when the bytes are first needed.
    pub(crate) fn with_archive(payload: Vec<u8>, archive: Archive) -> SnapshotData {
        SnapshotData { bytes: Cursor::new(payload), archive: Some(archive) }
    }

    fn complete(&mut self) -> io::Result<()> {
        if let Some(archive) = self.archive.take() {
            append_archive(&archive, self.bytes.get_mut()).map_err(io::Error::other)?;
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
