//! Intake against real files: JPEG/PNG/TIFF written by the `image` crate, deliberately broken
//! files, and a video made by ffmpeg (installed by ops/install-build-deps).

use std::path::{Path, PathBuf};
use std::process::Command;

use suanli_cv::intake::{
    extract_frames, extract_frames_with, import_dir, load_bytes, load_file, FrameOptions, FrameSampling, ImageFormat, IntakeError, IntakeLimits, IntakeOptions,
    RejectKind,
};

fn gradient(w: u32, h: u32, seed: u8) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, seed.wrapping_mul(3)]))
}

fn encoded(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, bytes).expect("write");
    path
}

/// A 1x1 GIF89a (intake does not accept GIF).
const GIF: &[u8] =
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

fn png_with_flipped_idat(png: &[u8]) -> Vec<u8> {
    let mut bad = png.to_vec();
    let at = bad.windows(4).position(|w| w == b"IDAT").expect("IDAT chunk");
    for b in &mut bad[at + 6..at + 10] {
        *b ^= 0xFF;
    }
    bad
}

#[test]
fn each_format_loads_with_its_pixels_and_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = gradient(20, 10, 9);
    for (name, format, expected) in [
        ("a.png", image::ImageFormat::Png, ImageFormat::Png),
        ("b.tif", image::ImageFormat::Tiff, ImageFormat::Tiff),
        ("c.jpg", image::ImageFormat::Jpeg, ImageFormat::Jpeg),
    ] {
        let bytes = encoded(&img, format);
        let path = write(dir.path(), name, &bytes);
        let loaded = load_file(&path).expect("loads");
        assert_eq!(loaded.name, name);
        assert_eq!(loaded.format, expected);
        assert_eq!((loaded.image.width, loaded.image.height, loaded.image.channels), (20, 10, 3));
        assert_eq!(loaded.image.data.len(), 20 * 10 * 3);
        assert_eq!(loaded.sha256, {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        });
        if expected != ImageFormat::Jpeg {
            // Lossless formats come back exactly.
            assert_eq!(loaded.image, suanli_cv::Image::from_rgb8(&img), "{name}");
        }
    }
    // Grayscale stays one channel.
    let gray = image::GrayImage::from_fn(4, 3, |x, y| image::Luma([(x * 60 + y) as u8]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    gray.write_to(&mut bytes, image::ImageFormat::Png).expect("encode");
    let loaded = load_bytes("g.png", bytes.get_ref(), &IntakeLimits::default()).expect("loads");
    assert_eq!(loaded.image.channels, 1);
    assert_eq!(loaded.image.get(3, 2, 0), (3.0 * 60.0 + 2.0) / 255.0);
    // 16-bit grayscale keeps its precision.
    let deep = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(3, 1, |x, _| image::Luma([[0u16, 1, 65535][x as usize]]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    deep.write_to(&mut bytes, image::ImageFormat::Png).expect("encode");
    let loaded = load_bytes("deep.png", bytes.get_ref(), &IntakeLimits::default()).expect("loads");
    assert_eq!(loaded.image.channels, 1);
    assert_eq!(loaded.image.data, [0.0, 1.0 / 65535.0, 1.0]);
}

#[test]
fn format_comes_from_the_bytes_not_the_name() {
    let png = encoded(&gradient(3, 3, 1), image::ImageFormat::Png);
    let loaded = load_bytes("really_a_png.jpg", &png, &IntakeLimits::default()).expect("loads");
    assert_eq!(loaded.format, ImageFormat::Png);
    let err = load_bytes("notes.png", b"hello, world\n", &IntakeLimits::default()).map(|_| ()).expect_err("text");
    assert!(matches!(err, IntakeError::UnsupportedFormat { .. }), "{err}");
    assert!(err.to_string().contains("text"), "{err}");
}

#[test]
fn bad_files_each_have_their_own_error() {
    let limits = IntakeLimits::default();
    let jpeg = encoded(&gradient(64, 64, 3), image::ImageFormat::Jpeg);
    let png = encoded(&gradient(16, 16, 3), image::ImageFormat::Png);
    let cases: Vec<(&str, Vec<u8>, RejectKind)> = vec![
        ("truncated.jpg", jpeg[..jpeg.len() / 2].to_vec(), RejectKind::Corrupt),
        ("flipped.png", png_with_flipped_idat(&png), RejectKind::Corrupt),
        ("text.jpg", b"not an image at all".to_vec(), RejectKind::UnsupportedFormat),
        ("empty.png", Vec::new(), RejectKind::Empty),
        ("anim.gif", GIF.to_vec(), RejectKind::UnsupportedFormat),
        ("header_only.png", png[..20].to_vec(), RejectKind::Corrupt),
    ];
    for (name, bytes, kind) in cases {
        let err = load_bytes(name, &bytes, &limits).map(|_| ()).expect_err(name);
        assert_eq!(err.kind(), kind, "{name}: {err}");
        assert!(err.to_string().starts_with(name), "the error names the file: {err}");
    }
    // Data after the end-of-image marker (some cameras append some) is not truncation.
    let mut trailing = jpeg.clone();
    trailing.extend_from_slice(b"appended by a camera");
    assert!(load_bytes("trailing.jpg", &trailing, &limits).is_ok());
    let small = IntakeLimits { max_width: 8, ..IntakeLimits::default() };
    let err = load_bytes("wide.png", &png, &small).map(|_| ()).expect_err("too wide");
    assert_eq!(err.kind(), RejectKind::TooLarge, "{err}");
    let few_pixels = IntakeLimits { max_pixels: 100, ..IntakeLimits::default() };
    assert_eq!(load_bytes("many.png", &png, &few_pixels).map(|_| ()).expect_err("too many").kind(), RejectKind::TooLarge);
    let small_files = IntakeLimits { max_file_bytes: 10, ..IntakeLimits::default() };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "big.png", &png);
    assert_eq!(suanli_cv::intake::load_file_with(&path, &small_files).map(|_| ()).expect_err("big file").kind(), RejectKind::TooLarge);
    let err = load_file(dir.path().join("missing.png")).map(|_| ()).expect_err("missing");
    assert_eq!(err.kind(), RejectKind::Io);
}

#[test]
fn import_keeps_the_good_rejects_the_bad_and_stores_duplicates_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let jpeg = encoded(&gradient(64, 48, 1), image::ImageFormat::Jpeg);
    let png = encoded(&gradient(16, 12, 2), image::ImageFormat::Png);
    let tiff = encoded(&gradient(8, 8, 3), image::ImageFormat::Tiff);
    write(root, "cats/one.jpg", &jpeg);
    write(root, "cats/two.png", &png);
    write(root, "dogs/three.tif", &tiff);
    write(root, "dogs/deeper/four.png", &encoded(&gradient(5, 5, 4), image::ImageFormat::Png));
    write(root, "loose.png", &encoded(&gradient(6, 6, 5), image::ImageFormat::Png));
    // Same bytes as cats/two.png under two other names: stored once.
    write(root, "dogs/copy_of_two.png", &png);
    write(root, "zzz/again.png", &png);
    // Bad files.
    write(root, "cats/truncated.jpg", &jpeg[..jpeg.len() / 2]);
    write(root, "dogs/crc.png", &png_with_flipped_idat(&png));
    write(root, "dogs/readme.jpg", b"this is a text file\n");
    write(root, "empty.png", b"");
    write(root, "anim.gif", GIF);
    // Hidden files and directories are skipped without a word.
    write(root, ".DS_Store", b"junk");
    write(root, ".git/objects/x.png", &png);
    write(root, "cats/.hidden.png", &png);
    // A link back to the root would loop; it is reported, not followed.
    std::os::unix::fs::symlink(root, root.join("dogs/loop")).expect("symlink");

    let options = IntakeOptions { labels_from_subdirs: true, threads: 2, ..IntakeOptions::default() };
    let report = import_dir(root, &options).expect("import");
    let names: Vec<&str> = report.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["cats/one.jpg", "cats/two.png", "dogs/deeper/four.png", "dogs/three.tif", "loose.png"]);
    let labels: Vec<Option<&str>> = report.images.iter().map(|i| i.label.as_deref()).collect();
    assert_eq!(labels, [Some("cats"), Some("cats"), Some("dogs"), Some("dogs"), None]);
    assert_eq!(report.duplicates, [("dogs/copy_of_two.png".to_owned(), "cats/two.png".to_owned()), ("zzz/again.png".to_owned(), "cats/two.png".to_owned())]);
    let rejected: Vec<(&str, RejectKind)> = report.rejected.iter().map(|r| (r.name.as_str(), r.kind)).collect();
    assert_eq!(
        rejected,
        [
            ("anim.gif", RejectKind::UnsupportedFormat),
            ("cats/truncated.jpg", RejectKind::Corrupt),
            ("dogs/crc.png", RejectKind::Corrupt),
            ("dogs/loop", RejectKind::Io),
            ("dogs/readme.jpg", RejectKind::UnsupportedFormat),
            ("empty.png", RejectKind::Empty),
        ]
    );
    for r in report.rejected.iter().filter(|r| r.kind != RejectKind::Io) {
        assert!(r.reason.contains(&r.name), "{r:?}");
    }
    // Same result on one thread, and without labels none are set.
    let single = import_dir(root, &IntakeOptions { threads: 1, ..IntakeOptions::default() }).expect("import");
    assert_eq!(single.images.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), names);
    assert!(single.images.iter().all(|i| i.label.is_none()));
    assert_eq!(single.rejected, report.rejected);
    assert_eq!(single.duplicates, report.duplicates);

    assert!(matches!(import_dir(root.join("nope"), &options), Err(IntakeError::Io { .. })));
}

fn ffmpeg_available() {
    let ok = Command::new("ffmpeg").arg("-version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "these tests need the ffmpeg CLI: run ops/install-build-deps (Debian package `ffmpeg`)");
}

/// 2 s of ffmpeg's test pattern at 10 fps, 64x48: 20 frames.
fn test_video(dir: &Path) -> PathBuf {
    ffmpeg_available();
    let path = dir.join("test.mp4");
    // mpeg4 is ffmpeg's built-in encoder (libx264 is optional); it has inter frames, as real
    // videos do.
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-t", "2", "-c:v", "mpeg4", "-y"])
        .arg(&path)
        .output()
        .expect("run ffmpeg");
    assert!(out.status.success(), "ffmpeg: {}", String::from_utf8_lossy(&out.stderr));
    path
}

#[test]
fn frames_from_video_every_nth_and_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let video = test_video(dir.path());
    let out = dir.path().join("frames");
    let frames = extract_frames(&video, &FrameOptions { sampling: FrameSampling::EveryNth { n: 5 }, max_frames: None }, &out).expect("frames");
    let names: Vec<String> = frames.iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["frame_000001.png", "frame_000002.png", "frame_000003.png", "frame_000004.png"]);
    for frame in &frames {
        let img = load_file(frame).expect("frame loads");
        assert_eq!((img.image.width, img.image.height, img.format), (64, 48, ImageFormat::Png));
    }
    // The frames import like any other images.
    let report = import_dir(&out, &IntakeOptions::default()).expect("import");
    assert_eq!(report.images.len(), 4);
    assert!(report.rejected.is_empty());

    // Refuses to mix with frames already there.
    let again = extract_frames(&video, &FrameOptions { sampling: FrameSampling::EveryNth { n: 5 }, max_frames: None }, &out);
    assert!(matches!(again, Err(IntakeError::OutputNotEmpty(_))), "{again:?}");

    let capped =
        extract_frames(&video, &FrameOptions { sampling: FrameSampling::Fps { fps: 5.0 }, max_frames: Some(3) }, dir.path().join("capped")).expect("frames");
    assert_eq!(capped.len(), 3);
    let all = extract_frames(&video, &FrameOptions { sampling: FrameSampling::Fps { fps: 2.0 }, max_frames: None }, dir.path().join("fps")).expect("frames");
    assert!((4..=5).contains(&all.len()), "2 s at 2 fps: {}", all.len());
}

#[test]
fn video_errors_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    ffmpeg_available();
    let every = FrameOptions { sampling: FrameSampling::EveryNth { n: 1 }, max_frames: None };
    let bogus = write(dir.path(), "bogus.mp4", b"definitely not a video");
    let err = extract_frames(&bogus, &every, dir.path().join("out")).map(|_| ()).expect_err("unreadable");
    match &err {
        IntakeError::VideoUnreadable { stderr, .. } => assert!(stderr.contains("Invalid data"), "{err}"),
        other => panic!("{other}"),
    }
    let err = extract_frames(dir.path().join("missing.mp4"), &every, dir.path().join("out2")).map(|_| ()).expect_err("missing");
    assert!(matches!(err, IntakeError::Io { .. }), "{err}");
    let err = extract_frames_with("/nonexistent/ffmpeg", &bogus, &every, dir.path().join("out3")).map(|_| ()).expect_err("no ffmpeg");
    assert!(matches!(err, IntakeError::FfmpegMissing { .. }), "{err}");
    assert!(err.to_string().contains("ffmpeg"), "{err}");
    for sampling in [FrameSampling::EveryNth { n: 0 }, FrameSampling::Fps { fps: 0.0 }, FrameSampling::Fps { fps: f32::NAN }] {
        let err = extract_frames(&bogus, &FrameOptions { sampling, max_frames: None }, dir.path().join("out4")).map(|_| ()).expect_err("invalid");
        assert!(matches!(err, IntakeError::InvalidOptions(_)), "{err}");
    }
    // Options as a job spec writes them.
    let options: FrameOptions = serde_json::from_str(r#"{"sampling": {"mode": "every_nth", "n": 5}, "max_frames": 10}"#).expect("parses");
    assert_eq!(options, FrameOptions { sampling: FrameSampling::EveryNth { n: 5 }, max_frames: Some(10) });
}
