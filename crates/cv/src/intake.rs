//! Image intake (SPEC §6): JPEG, PNG and TIFF files, whole directory trees, and frames from
//! video.
//!
//! Every file is checked on its own: a bad file (wrong format, corrupt, too large, empty,
//! unreadable) becomes one [`Rejected`] entry with its name and a reason, and the import goes
//! on with the rest. Files are content-addressed by the SHA-256 of their bytes, so the same
//! picture copied twice is stored once.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ::image::{DynamicImage, ImageDecoder, ImageReader};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::image::Image;

/// The formats intake accepts, told apart by their first bytes, never by the file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Jpeg,
    Png,
    Tiff,
}

impl ImageFormat {
    /// The format whose signature `bytes` start with, if it is one intake accepts.
    pub fn detect(bytes: &[u8]) -> Option<ImageFormat> {
        // JPEG: SOI marker followed by the start of the next marker.
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            return Some(ImageFormat::Jpeg);
        }
        if bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) {
            return Some(ImageFormat::Png);
        }
        // TIFF, little- or big-endian, classic (42) or BigTIFF (43).
        if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") || bytes.starts_with(b"II+\0") || bytes.starts_with(b"MM\0+") {
            return Some(ImageFormat::Tiff);
        }
        None
    }

    fn codec(self) -> ::image::ImageFormat {
        match self {
            ImageFormat::Jpeg => ::image::ImageFormat::Jpeg,
            ImageFormat::Png => ::image::ImageFormat::Png,
            ImageFormat::Tiff => ::image::ImageFormat::Tiff,
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            ImageFormat::Tiff => "TIFF",
        })
    }
}

/// Bounds checked against the header *before* pixels are decoded, so a decompression bomb (a
/// tiny file claiming 100000x100000 pixels) is refused without allocating its buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Width times height. The decoded image costs 12 bytes a pixel (RGB `f32`).
    pub max_pixels: u64,
    /// Files larger than this are not even read into memory.
    pub max_file_bytes: u64,
}

impl Default for IntakeLimits {
    fn default() -> Self {
        IntakeLimits { max_width: 16384, max_height: 16384, max_pixels: 256 * 1024 * 1024, max_file_bytes: 1 << 30 }
    }
}

/// What kind of problem rejected a file; the machine-readable half of [`Rejected`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    /// Not JPEG, PNG or TIFF (or a variant of them the decoders do not support).
    UnsupportedFormat,
    /// The format was recognised but the data does not decode.
    Corrupt,
    /// Over [`IntakeLimits`].
    TooLarge,
    /// Zero bytes.
    Empty,
    /// Could not be read at all.
    Io,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{name}: empty file")]
    Empty { name: String },
    #[error("{name}: unsupported format ({detail}); accepted are JPEG, PNG and TIFF")]
    UnsupportedFormat { name: String, detail: String },
    #[error("{name}: corrupt {format} file: {reason}")]
    Corrupt { name: String, format: ImageFormat, reason: String },
    #[error("{name}: too large: {detail}")]
    TooLarge { name: String, detail: String },
    #[error("{name}: the decoder crashed on this file")]
    DecoderPanic { name: String },
    #[error("invalid frame options: {0}")]
    InvalidOptions(String),
    #[error("ffmpeg not found as {program:?} (install the `ffmpeg` package): {source}")]
    FfmpegMissing { program: PathBuf, source: std::io::Error },
    #[error("ffmpeg could not read {path}: {stderr}")]
    VideoUnreadable { path: PathBuf, stderr: String },
    #[error("{0} already holds extracted frames (frame_*.png); use an empty directory")]
    OutputNotEmpty(PathBuf),
}

impl IntakeError {
    /// How an import reports this error. Only file-level errors occur there; video errors map
    /// to the nearest kind.
    pub fn kind(&self) -> RejectKind {
        match self {
            IntakeError::Io { .. } | IntakeError::FfmpegMissing { .. } | IntakeError::OutputNotEmpty(_) => RejectKind::Io,
            IntakeError::Empty { .. } => RejectKind::Empty,
            IntakeError::UnsupportedFormat { .. } | IntakeError::InvalidOptions(_) => RejectKind::UnsupportedFormat,
            IntakeError::Corrupt { .. } | IntakeError::DecoderPanic { .. } | IntakeError::VideoUnreadable { .. } => RejectKind::Corrupt,
            IntakeError::TooLarge { .. } => RejectKind::TooLarge,
        }
    }
}

/// One decoded, accepted image.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedImage {
    /// Path relative to the import root, `/`-separated (the file name for [`load_file`]).
    pub name: String,
    /// Hex SHA-256 of the file's bytes: the content address.
    pub sha256: String,
    pub format: ImageFormat,
    /// With [`IntakeOptions::labels_from_subdirs`], the first directory under the root.
    pub label: Option<String>,
    pub image: Image,
}

/// A file an import did not accept, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
    pub kind: RejectKind,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeOptions {
    pub limits: IntakeLimits,
    /// Class label = the first directory component (`cats/a.jpg` → `cats`); files directly in
    /// the root get none.
    pub labels_from_subdirs: bool,
    /// Decoding threads; 0 means one per available core.
    pub threads: usize,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct IntakeReport {
    /// Accepted images in sorted name order, each content once.
    pub images: Vec<LoadedImage>,
    /// Bad files in sorted name order.
    pub rejected: Vec<Rejected>,
    /// `(duplicate name, name of the first file with the same bytes)`.
    pub duplicates: Vec<(String, String)>,
}

/// Loads one file with the default [`IntakeLimits`]; its name is the file name.
pub fn load_file(path: impl AsRef<Path>) -> Result<LoadedImage, IntakeError> {
    load_file_with(path, &IntakeLimits::default())
}

pub fn load_file_with(path: impl AsRef<Path>, limits: &IntakeLimits) -> Result<LoadedImage, IntakeError> {
    let path = path.as_ref();
    let name = path.file_name().unwrap_or(path.as_os_str()).to_string_lossy().into_owned();
    let bytes = read_limited(path, &name, limits)?;
    load_bytes(name, &bytes, limits)
}

/// Decodes an in-memory file. `name` is only used in the result and in errors.
pub fn load_bytes(name: impl Into<String>, bytes: &[u8], limits: &IntakeLimits) -> Result<LoadedImage, IntakeError> {
    let name = name.into();
    if bytes.is_empty() {
        return Err(IntakeError::Empty { name });
    }
    let sha256 = hex::encode(Sha256::digest(bytes));
    let Some(format) = ImageFormat::detect(bytes) else {
        return Err(IntakeError::UnsupportedFormat { name, detail: describe_signature(bytes) });
    };
    let image = decode(&name, format, bytes, limits)?;
    Ok(LoadedImage { name, sha256, format, label: None, image })
}

fn read_limited(path: &Path, name: &str, limits: &IntakeLimits) -> Result<Vec<u8>, IntakeError> {
    let io = |source| IntakeError::Io { path: path.to_path_buf(), source };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > limits.max_file_bytes {
        return Err(IntakeError::TooLarge { name: name.to_owned(), detail: format!("{len} bytes, the limit is {}", limits.max_file_bytes) });
    }
    std::fs::read(path).map_err(io)
}

/// What [`inspect_bytes`] found: a file that decodes whole, without keeping its pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspected {
    pub sha256: String,
    pub format: ImageFormat,
    /// After the EXIF orientation is applied.
    pub width: u32,
    pub height: u32,
}

/// Checks a file as [`load_bytes`] does (format, limits, every byte decodes) and keeps only
/// its hash and size: how a dataset service accepts uploads without the cost of `f32` pixels.
pub fn inspect_bytes(name: impl Into<String>, bytes: &[u8], limits: &IntakeLimits) -> Result<Inspected, IntakeError> {
    let name = name.into();
    if bytes.is_empty() {
        return Err(IntakeError::Empty { name });
    }
    let Some(format) = ImageFormat::detect(bytes) else {
        return Err(IntakeError::UnsupportedFormat { name, detail: describe_signature(bytes) });
    };
    let image = decode_dynamic(&name, format, bytes, limits)?;
    Ok(Inspected { sha256: hex::encode(Sha256::digest(bytes)), format, width: image.width(), height: image.height() })
}

/// A PNG of the picture in `bytes` at most `edge` pixels on either side (for browsing a
/// dataset), checked against `limits` like any intake.
pub fn thumbnail_png(bytes: &[u8], edge: u32, limits: &IntakeLimits) -> Result<Vec<u8>, IntakeError> {
    let name = "thumbnail";
    let Some(format) = ImageFormat::detect(bytes) else {
        return Err(IntakeError::UnsupportedFormat { name: name.into(), detail: describe_signature(bytes) });
    };
    let image = decode_dynamic(name, format, bytes, limits)?;
    let mut out = Cursor::new(Vec::new());
    image.thumbnail(edge, edge).write_to(&mut out, ::image::ImageFormat::Png).map_err(|e| IntakeError::Corrupt {
        name: name.into(),
        format,
        reason: format!("could not be written as a PNG: {e}"),
    })?;
    Ok(out.into_inner())
}

fn decode(name: &str, format: ImageFormat, bytes: &[u8], limits: &IntakeLimits) -> Result<Image, IntakeError> {
    decode_dynamic(name, format, bytes, limits).map(to_image)
}

fn decode_dynamic(name: &str, format: ImageFormat, bytes: &[u8], limits: &IntakeLimits) -> Result<DynamicImage, IntakeError> {
    let corrupt = |reason: String| IntakeError::Corrupt { name: name.to_owned(), format, reason };
    if format == ImageFormat::Jpeg {
        jpeg_structure(bytes).map_err(corrupt)?;
    }
    let from_image_error = |e: ::image::ImageError| match e {
        ::image::ImageError::Limits(l) => IntakeError::TooLarge { name: name.to_owned(), detail: l.to_string() },
        ::image::ImageError::Unsupported(u) => IntakeError::UnsupportedFormat { name: name.to_owned(), detail: u.to_string() },
        // From an in-memory cursor an I/O error can only be running out of data: truncation.
        ::image::ImageError::IoError(io) => corrupt(format!("truncated ({io})")),
        other => corrupt(other.to_string()),
    };
    let mut decoder = ImageReader::with_format(Cursor::new(bytes), format.codec()).into_decoder().map_err(from_image_error)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(corrupt(format!("header says {width}x{height} pixels")));
    }
    let pixels = u64::from(width) * u64::from(height);
    if width > limits.max_width || height > limits.max_height || pixels > limits.max_pixels {
        return Err(IntakeError::TooLarge {
            name: name.to_owned(),
            detail: format!("{width}x{height} pixels, the limits are {}x{} and {} pixels", limits.max_width, limits.max_height, limits.max_pixels),
        });
    }
    // Camera JPEGs are stored sideways with an EXIF orientation tag; training on them as
    // stored would feed rotated pictures. A missing or unreadable tag means "as stored".
    let orientation = decoder.orientation().unwrap_or(::image::metadata::Orientation::NoTransforms);
    let mut dynamic = DynamicImage::from_decoder(decoder).map_err(from_image_error)?;
    dynamic.apply_orientation(orientation);
    Ok(dynamic)
}

/// Grayscale files (8 or 16 bit, with or without alpha) stay one channel, everything else
/// becomes RGB; 16-bit and float samples keep their precision rather than going through 8
/// bits. Alpha is dropped: training images are opaque.
fn to_image(dynamic: DynamicImage) -> Image {
    let (width, height) = (dynamic.width(), dynamic.height());
    if dynamic.color().has_color() {
        Image { width, height, channels: 3, data: dynamic.into_rgb32f().into_raw() }
    } else {
        Image { width, height, channels: 1, data: dynamic.to_luma32f().into_raw() }
    }
}

/// Walks a JPEG's segments to its end-of-image marker. The JPEG decoder fills a truncated
/// file's missing rows with gray and reports success; a half-uploaded photo must be rejected,
/// not trained on.
fn jpeg_structure(bytes: &[u8]) -> Result<(), String> {
    let truncated = || "truncated (no end-of-image marker)".to_owned();
    let len = bytes.len();
    let mut i = 2; // past SOI
    loop {
        // Tolerate junk between segments as decoders do: resynchronise on the next 0xFF.
        i += bytes.get(i..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)).ok_or_else(truncated)?;
        while i < len && bytes[i] == 0xFF {
            i += 1; // fill bytes
        }
        let marker = *bytes.get(i).ok_or_else(truncated)?;
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            // Markers without a length field.
            0x01 | 0xD0..=0xD8 => continue,
            _ => {
                let field = bytes.get(i..i + 2).ok_or_else(truncated)?;
                let seg_len = usize::from(u16::from_be_bytes([field[0], field[1]]));
                if seg_len < 2 {
                    return Err(format!("bad segment length {seg_len} at byte {i}"));
                }
                i += seg_len;
                if i > len {
                    return Err(truncated());
                }
                if marker == 0xDA {
                    // Entropy-coded data runs to the first 0xFF that is neither stuffing
                    // (FF 00), a restart marker (FF D0-D7) nor fill (FF FF).
                    loop {
                        let j = i + bytes[i..].iter().position(|&b| b == 0xFF).ok_or_else(truncated)?;
                        match bytes.get(j + 1).ok_or_else(truncated)? {
                            0x00 | 0xD0..=0xD7 => i = j + 2,
                            0xFF => i = j + 1,
                            _ => {
                                i = j;
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A short, human description of a signature intake does not accept.
fn describe_signature(bytes: &[u8]) -> String {
    let known: &[(&[u8], &str)] = &[
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"BM", "BMP"),
        (b"RIFF", "RIFF (WebP/AVI/WAV)"),
        (b"%PDF", "PDF"),
        (b"PK\x03\x04", "ZIP"),
        (b"\x1A\x45\xDF\xA3", "Matroska/WebM video"),
    ];
    for (magic, what) in known {
        if bytes.starts_with(magic) {
            return format!("looks like {what}");
        }
    }
    if bytes.len() >= 8 && &bytes[4..8] == b"ftyp" {
        return "looks like MP4/HEIC (ISO media)".to_owned();
    }
    let head = &bytes[..bytes.len().min(512)];
    if std::str::from_utf8(head).is_ok_and(|s| !s.contains('\0')) {
        return "looks like text".to_owned();
    }
    format!("unknown signature {}", hex::encode(&bytes[..bytes.len().min(8)]))
}

/// Imports every non-hidden file under `root`, recursively, in sorted name order.
///
/// Only a `root` that cannot be listed is an error; every problem below it (a bad file, an
/// unreadable subdirectory) is a [`Rejected`] entry and the import goes on.
pub fn import_dir(root: impl AsRef<Path>, options: &IntakeOptions) -> Result<IntakeReport, IntakeError> {
    let root = root.as_ref();
    let mut files = Vec::new();
    let mut rejected = Vec::new();
    std::fs::read_dir(root).map_err(|source| IntakeError::Io { path: root.to_path_buf(), source })?;
    walk(root, String::new(), &mut files, &mut rejected);
    files.sort_by(|a: &(String, PathBuf), b| a.0.cmp(&b.0));

    let loaded = load_all(&files, options);

    let mut report = IntakeReport { rejected, ..IntakeReport::default() };
    // sha256 → the first file with those bytes: its name, or its rejection.
    let mut seen: HashMap<String, Result<String, (String, RejectKind)>> = HashMap::new();
    for ((name, _), result) in files.iter().zip(loaded) {
        match result {
            Ok(mut img) => match seen.get(&img.sha256) {
                Some(Ok(first)) => report.duplicates.push((name.clone(), first.clone())),
                _ => {
                    seen.insert(img.sha256.clone(), Ok(name.clone()));
                    if options.labels_from_subdirs {
                        img.label = name.split_once('/').map(|(dir, _)| dir.to_owned());
                    }
                    report.images.push(img);
                }
            },
            Err((err, sha)) => {
                tracing::warn!(file = %name, error = %err, "intake rejected a file");
                if let Some(sha) = sha {
                    seen.entry(sha).or_insert_with(|| Err((err.to_string(), err.kind())));
                }
                report.rejected.push(Rejected { name: name.clone(), reason: err.to_string(), kind: err.kind() });
            }
        }
    }
    report.rejected.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(report)
}

/// Collects `(relative name, path)` of regular files, skipping hidden entries (dotfiles,
/// `.git`, editors' swap files): they are never training data.
fn walk(dir: &Path, prefix: String, files: &mut Vec<(String, PathBuf)>, rejected: &mut Vec<Rejected>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            rejected.push(Rejected { name: prefix, reason: format!("cannot list directory: {e}"), kind: RejectKind::Io });
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                rejected.push(Rejected { name: prefix.clone(), reason: format!("cannot list directory: {e}"), kind: RejectKind::Io });
                continue;
            }
        };
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if file_name.starts_with('.') {
            continue;
        }
        let name = if prefix.is_empty() { file_name.into_owned() } else { format!("{prefix}/{file_name}") };
        let path = entry.path();
        let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
        // metadata() follows symlinks: a link to an image imports the image. Linked
        // directories are not entered: a link to an ancestor would recurse forever.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() && is_link => {
                rejected.push(Rejected { name, reason: "symbolic link to a directory, not followed".to_owned(), kind: RejectKind::Io })
            }
            Ok(meta) if meta.is_dir() => walk(&path, name, files, rejected),
            Ok(meta) if meta.is_file() => files.push((name, path)),
            Ok(_) => {}
            Err(e) => rejected.push(Rejected { name, reason: e.to_string(), kind: RejectKind::Io }),
        }
    }
}

type LoadResult = Result<LoadedImage, (IntakeError, Option<String>)>;

/// Loads `files` on a few threads; results come back in `files`' order.
fn load_all(files: &[(String, PathBuf)], options: &IntakeOptions) -> Vec<LoadResult> {
    let load_one = |(name, path): &(String, PathBuf)| -> LoadResult {
        let bytes = read_limited(path, name, &options.limits).map_err(|e| (e, None))?;
        // A decoder bug on one hostile file must not abort the whole import.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_bytes(name.clone(), &bytes, &options.limits)))
            .unwrap_or_else(|_| Err(IntakeError::DecoderPanic { name: name.clone() }))
            .map_err(|e| {
                let sha = (!bytes.is_empty()).then(|| hex::encode(Sha256::digest(&bytes)));
                (e, sha)
            })
    };
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(files.len());
    if threads <= 1 {
        return files.iter().map(load_one).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<LoadResult>>> = Mutex::new((0..files.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(file) = files.get(i) else { break };
                let result = load_one(file);
                let mut slots = results.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                slots[i] = Some(result);
            });
        }
    });
    let slots = results.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    slots
        .into_iter()
        .zip(files)
        // Every slot is filled: workers only stop once the index runs past the end.
        .map(|(slot, (name, _))| slot.unwrap_or_else(|| Err((IntakeError::DecoderPanic { name: name.clone() }, None))))
        .collect()
}

/// Which frames of a video to keep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "snake_case")]
pub enum FrameSampling {
    /// Frames 0, n, 2n, … of the decoded stream.
    EveryNth { n: u32 },
    /// A fixed rate in frames per second of video time, whatever the video's own rate.
    Fps { fps: f32 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameOptions {
    pub sampling: FrameSampling,
    /// Stop after this many frames.
    #[serde(default)]
    pub max_frames: Option<u32>,
}

/// Extracts frames of `video_path` into `out_dir` as `frame_000001.png`, … with the `ffmpeg`
/// found on `PATH`; returns their paths in order.
pub fn extract_frames(video_path: impl AsRef<Path>, options: &FrameOptions, out_dir: impl AsRef<Path>) -> Result<Vec<PathBuf>, IntakeError> {
    extract_frames_with("ffmpeg", video_path, options, out_dir)
}

/// [`extract_frames`] with an explicit ffmpeg program.
pub fn extract_frames_with(
    ffmpeg: impl AsRef<OsStr>,
    video_path: impl AsRef<Path>,
    options: &FrameOptions,
    out_dir: impl AsRef<Path>,
) -> Result<Vec<PathBuf>, IntakeError> {
    let (video, out_dir) = (video_path.as_ref(), out_dir.as_ref());
    let filter = match options.sampling {
        FrameSampling::EveryNth { n: 0 } => return Err(IntakeError::InvalidOptions("every_nth.n must be >= 1".into())),
        FrameSampling::EveryNth { n } => format!("select=not(mod(n\\,{n}))"),
        FrameSampling::Fps { fps } if !(fps.is_finite() && fps > 0.0) => return Err(IntakeError::InvalidOptions(format!("fps must be > 0, got {fps}"))),
        FrameSampling::Fps { fps } => format!("fps={fps}"),
    };
    if options.max_frames == Some(0) {
        return Err(IntakeError::InvalidOptions("max_frames must be >= 1".into()));
    }
    // ffmpeg's own "file not found" is a line deep in its log; say it plainly.
    std::fs::metadata(video).map_err(|source| IntakeError::Io { path: video.to_path_buf(), source })?;
    std::fs::create_dir_all(out_dir).map_err(|source| IntakeError::Io { path: out_dir.to_path_buf(), source })?;
    // ffmpeg would overwrite old frames but leave those past the new count behind, and the
    // result would silently mix two videos.
    if !list_frames(out_dir)?.is_empty() {
        return Err(IntakeError::OutputNotEmpty(out_dir.to_path_buf()));
    }

    let ffmpeg = ffmpeg.as_ref();
    let mut cmd = Command::new(ffmpeg);
    // Local files only: a playlist or concat "video" could otherwise make ffmpeg read other
    // files or URLs.
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-protocol_whitelist", "file", "-i"])
        .arg(video)
        .args(["-map", "0:v:0", "-vf", &filter])
        // Keep each selected frame once, without ffmpeg duplicating or dropping frames to
        // hold a constant output rate.
        .args(["-fps_mode", "vfr"]);
    if let Some(max) = options.max_frames {
        cmd.args(["-frames:v", &max.to_string()]);
    }
    cmd.arg(out_dir.join("frame_%06d.png")).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let output = cmd.output().map_err(|source| IntakeError::FfmpegMissing { program: PathBuf::from(ffmpeg), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no error output").trim().to_owned();
        return Err(IntakeError::VideoUnreadable { path: video.to_path_buf(), stderr: format!("{last} ({})", output.status) });
    }
    let frames = list_frames(out_dir)?;
    if frames.is_empty() {
        return Err(IntakeError::VideoUnreadable { path: video.to_path_buf(), stderr: "no video frames decoded".into() });
    }
    Ok(frames)
}

/// `frame_NNNNNN.png` files in `dir`, sorted.
fn list_frames(dir: &Path) -> Result<Vec<PathBuf>, IntakeError> {
    let io = |source| IntakeError::Io { path: dir.to_path_buf(), source };
    let mut frames = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_frame = name
            .strip_prefix("frame_")
            .and_then(|rest| rest.strip_suffix(".png"))
            .is_some_and(|digits| digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit()));
        if is_frame {
            frames.push(entry.path());
        }
    }
    frames.sort();
    Ok(frames)
}
