//! The one in-memory image type of the pipeline: row-major, interleaved channels (HWC), `f32`
//! samples nominally in `0.0..=1.0`. Preprocessing works on it, tensors are made from it.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: u8,
    /// `height * width * channels` samples, row by row, channels interleaved.
    pub data: Vec<f32>,
}

impl Image {
    pub fn new(width: u32, height: u32, channels: u8) -> Self {
        Image { width, height, channels, data: vec![0.0; width as usize * height as usize * channels as usize] }
    }

    pub fn from_rgb8(rgb: &::image::RgbImage) -> Self {
        Image { width: rgb.width(), height: rgb.height(), channels: 3, data: rgb.as_raw().iter().map(|&b| f32::from(b) / 255.0).collect() }
    }

    pub fn from_luma8(gray: &::image::GrayImage) -> Self {
        Image { width: gray.width(), height: gray.height(), channels: 1, data: gray.as_raw().iter().map(|&b| f32::from(b) / 255.0).collect() }
    }

    /// Decoded pixels of any format `image` reads, as RGB (or grayscale when the file is).
    pub fn from_dynamic(img: &::image::DynamicImage) -> Self {
        match img {
            ::image::DynamicImage::ImageLuma8(g) => Self::from_luma8(g),
            other => Self::from_rgb8(&other.to_rgb8()),
        }
    }

    /// Back to 8-bit pixels (clamped, rounded), for saving and for viewing results.
    pub fn to_dynamic(&self) -> ::image::DynamicImage {
        let bytes: Vec<u8> = self.data.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
        match self.channels {
            1 => ::image::DynamicImage::ImageLuma8(::image::GrayImage::from_raw(self.width, self.height, bytes).expect("buffer size matches dimensions")),
            _ => ::image::DynamicImage::ImageRgb8(::image::RgbImage::from_raw(self.width, self.height, bytes).expect("buffer size matches dimensions")),
        }
    }

    #[inline]
    pub fn index(&self, x: u32, y: u32, c: u8) -> usize {
        (y as usize * self.width as usize + x as usize) * self.channels as usize + c as usize
    }

    #[inline]
    pub fn get(&self, x: u32, y: u32, c: u8) -> f32 {
        self.data[self.index(x, y, c)]
    }
}
