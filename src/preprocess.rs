//! Turning decoded images into network input, and network output back into a map.
//!
//! Exactly the reference app's preprocessing: RGB in [0, 1], ImageNet mean/std
//! per channel, zero padding at the top and on the right up to the network's
//! size rule, and the prediction cropped back to the input size. Pure functions
//! over plain buffers, so they are tested without libtorch.

use image::Rgb32FImage;

/// ImageNet channel means (RGB) the checkpoint was trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What input sizes the network accepts: sides are multiples of `multiple` and at
/// least `min_size` (PSMNet's coarsest pyramid pooling needs 64 cells at 1/4 size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PadRule {
    pub multiple: u32,
    pub min_size: u32,
}

impl PadRule {
    /// The rule of the stacked-hourglass PSMNet we export.
    pub const PSMNET: PadRule = PadRule { multiple: 16, min_size: 256 };

    fn side(&self, n: u32) -> u32 {
        n.div_ceil(self.multiple).saturating_mul(self.multiple).max(self.min_size)
    }

    /// Where an image of `width` x `height` sits inside the padded network input.
    pub fn geometry(&self, width: u32, height: u32) -> InputGeometry {
        let padded_width = self.side(width);
        let padded_height = self.side(height);
        InputGeometry { width, height, padded_width, padded_height, top_pad: padded_height - height }
    }
}

/// An image's placement in the padded input: padding goes on top and on the right,
/// so the image occupies rows `top_pad..` and columns `..width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputGeometry {
    pub width: u32,
    pub height: u32,
    pub padded_width: u32,
    pub padded_height: u32,
    pub top_pad: u32,
}

impl InputGeometry {
    pub fn right_pad(&self) -> u32 {
        self.padded_width - self.width
    }

    pub fn padded_len(&self) -> usize {
        self.padded_width as usize * self.padded_height as usize
    }
}

/// Normalised, zero-padded planar (C, H, W) input for one image.
///
/// Padding is applied after normalisation, so padded pixels are 0 in the
/// normalised space (as the reference pads its normalised numpy array).
pub fn normalise_and_pad(image: &Rgb32FImage, geometry: &InputGeometry) -> Vec<f32> {
    debug_assert_eq!((image.width(), image.height()), (geometry.width, geometry.height));
    let plane = geometry.padded_len();
    let pw = geometry.padded_width as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (x, y, pixel) in image.enumerate_pixels() {
        let offset = (y + geometry.top_pad) as usize * pw + x as usize;
        for c in 0..3 {
            out[c * plane + offset] = (pixel.0[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    out
}

/// Crops a padded (H, W) network output back to the image's own rows and columns.
pub fn crop(padded: &[f32], geometry: &InputGeometry) -> Vec<f32> {
    assert_eq!(padded.len(), geometry.padded_len(), "network output has the wrong size");
    let pw = geometry.padded_width as usize;
    let w = geometry.width as usize;
    let top = geometry.top_pad as usize;
    padded.chunks_exact(pw).skip(top).take(geometry.height as usize).flat_map(|row| row[..w].iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn pads_to_multiple_of_16_with_minimum_256() {
        let g = PadRule::PSMNET.geometry(1242, 375);
        assert_eq!((g.padded_width, g.padded_height, g.top_pad, g.right_pad()), (1248, 384, 9, 6));
        let g = PadRule::PSMNET.geometry(512, 384);
        assert_eq!((g.padded_width, g.padded_height, g.top_pad, g.right_pad()), (512, 384, 0, 0));
        // Small images are padded up to the pooling minimum, never refused.
        let g = PadRule::PSMNET.geometry(40, 30);
        assert_eq!((g.padded_width, g.padded_height, g.top_pad, g.right_pad()), (256, 256, 226, 216));
        let g = PadRule::PSMNET.geometry(257, 1);
        assert_eq!((g.padded_width, g.padded_height), (272, 256));
    }

    #[test]
    fn normalises_each_channel_and_zero_pads_top_and_right() {
        let mut image = Rgb32FImage::new(2, 1);
        image.put_pixel(0, 0, Rgb([0.485, 0.456, 0.406])); // exactly the mean -> 0
        image.put_pixel(1, 0, Rgb([1.0, 0.0, 0.5]));
        let rule = PadRule { multiple: 4, min_size: 1 };
        let g = rule.geometry(2, 1);
        assert_eq!((g.padded_width, g.padded_height, g.top_pad), (4, 4, 3));
        let input = normalise_and_pad(&image, &g);
        assert_eq!(input.len(), 3 * 16);
        let at = |c: usize, y: usize, x: usize| input[c * 16 + y * 4 + x];
        // The image lands on the bottom row, left-aligned.
        for c in 0..3 {
            assert!(at(c, 3, 0).abs() < 1e-6);
        }
        assert!((at(0, 3, 1) - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((at(1, 3, 1) - (0.0 - 0.456) / 0.224).abs() < 1e-6);
        assert!((at(2, 3, 1) - (0.5 - 0.406) / 0.225).abs() < 1e-6);
        // Everything else is padding, zero after normalisation.
        let nonzero = input.iter().filter(|v| **v != 0.0).count();
        assert_eq!(nonzero, 3);
    }

    #[test]
    fn crop_inverts_the_padding() {
        let rule = PadRule { multiple: 4, min_size: 1 };
        let g = rule.geometry(3, 2);
        // Padded output holds its own flat index; the image is rows 2..4, columns 0..3.
        let padded: Vec<f32> = (0..g.padded_len()).map(|i| i as f32).collect();
        assert_eq!(crop(&padded, &g), vec![8.0, 9.0, 10.0, 12.0, 13.0, 14.0]);
    }
}
