//! The network's input and output as tensors on the model's device.
//!
//! The per-pixel work (layout change, ImageNet normalisation, padding, the crop
//! back) runs as tensor operations on the device, so on a GPU the CPU only
//! copies the decoded image up and the cropped disparity down. The numbers are
//! exactly those of the pure reference functions
//! [`normalise_and_pad`](crate::preprocess::normalise_and_pad) and
//! [`crop`](crate::preprocess::crop) (same f32 operations in the same order;
//! the tests below compare them bit for bit), which stay the documented
//! definition of the preprocessing.

use image::Rgb32FImage;
use tch::{Device, Kind, TchError, Tensor};

use crate::preprocess::{InputGeometry, IMAGENET_MEAN, IMAGENET_STD};

/// ImageNet statistics as `[3, 1, 1]` tensors on the device, made once per model.
pub struct Normaliser {
    mean: Tensor,
    std: Tensor,
}

impl Normaliser {
    pub fn new(device: Device) -> Result<Normaliser, TchError> {
        let column = |values: &[f32; 3]| Tensor::f_from_slice(values)?.f_view([3, 1, 1])?.f_to_device(device);
        Ok(Normaliser { mean: column(&IMAGENET_MEAN)?, std: column(&IMAGENET_STD)? })
    }

    /// `[1, 3, padded_height, padded_width]` input for `image`: normalised, then
    /// zero-padded at the top and on the right.
    pub fn input(&self, image: &Rgb32FImage, geometry: &InputGeometry) -> Result<Tensor, TchError> {
        let (width, height) = (i64::from(geometry.width), i64::from(geometry.height));
        let hwc = Tensor::f_from_slice(image.as_raw())?.f_view([height, width, 3])?.f_to_device(self.mean.device())?;
        self.normalise(&hwc, geometry)
    }

    /// [`input`](Self::input) from a page-locked host buffer that
    /// [`PinnedStaging::write`] filled: a DMA copy to the GPU that does not
    /// block the CPU (a pageable copy is staged and waited for by the driver).
    pub fn input_pinned(&self, pinned: &Tensor, geometry: &InputGeometry) -> Result<Tensor, TchError> {
        let expected = [i64::from(geometry.height), i64::from(geometry.width), 3];
        if pinned.size() != expected {
            return Err(TchError::Shape(format!(
                "staging buffer {:?} does not fit a {expected:?} image",
                pinned.size()
            )));
        }
        let hwc = pinned.f_to_device_(self.mean.device(), Kind::Float, true, false)?;
        self.normalise(&hwc, geometry)
    }

    fn normalise(&self, hwc: &Tensor, geometry: &InputGeometry) -> Result<Tensor, TchError> {
        let normalised = hwc.f_permute([2, 0, 1])?.f_sub(&self.mean)?.f_div(&self.std)?;
        // Padding order: last dimension (left, right), then the one before (top, bottom).
        let pad = [0, i64::from(geometry.right_pad()), i64::from(geometry.top_pad), 0];
        normalised.f_constant_pad_nd(pad)?.f_unsqueeze(0)?.f_contiguous()
    }
}

/// Page-locked (pinned) host buffers for one image size on a CUDA device: the
/// two inputs, HWC float, and the cropped outputs (disparity, uncertainty).
/// Kept between requests and remade when the size changes, since pinning
/// memory is slow.
pub struct PinnedStaging {
    pub left: Tensor,
    pub right: Tensor,
    pub outputs: [Tensor; 2],
}

impl PinnedStaging {
    pub fn new(geometry: &InputGeometry, device: Device) -> Result<PinnedStaging, TchError> {
        let (width, height) = (i64::from(geometry.width), i64::from(geometry.height));
        let pinned = |shape: &[i64]| Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?.f_pin_memory(device);
        Ok(PinnedStaging {
            left: pinned(&[height, width, 3])?,
            right: pinned(&[height, width, 3])?,
            outputs: [pinned(&[height, width])?, pinned(&[height, width])?],
        })
    }

    /// Whether these buffers are the ones for `geometry`'s image size.
    pub fn fits(&self, geometry: &InputGeometry) -> bool {
        self.outputs[0].size() == [i64::from(geometry.height), i64::from(geometry.width)]
    }

    /// Copies the two images into the input buffers, side by side on two
    /// threads: one copy is bound by one core's memory bandwidth (about 1 ms
    /// for a KITTI-sized float image).
    pub fn write(&self, left: &Rgb32FImage, right: &Rgb32FImage) -> Result<(), TchError> {
        for (buffer, image) in [(&self.left, left), (&self.right, right)] {
            if buffer.numel() != image.as_raw().len() || buffer.kind() != Kind::Float || buffer.device() != Device::Cpu
            {
                return Err(TchError::Shape(format!("staging buffer {:?} does not fit the image", buffer.size())));
            }
        }
        // Raw addresses cross to the helper thread as integers (a pointer is not Send).
        let (left_ptr, right_ptr) = (self.left.data_ptr() as usize, self.right.data_ptr() as usize);
        let copy = |raw: &[f32], to: usize| {
            // SAFETY: `to` is the start of a contiguous CPU float buffer of exactly raw.len()
            // elements (checked above) that nothing else reads or writes now: every prediction
            // waits for its stream before returning, so no copy from it is pending.
            unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), to as *mut f32, raw.len()) }
        };
        rayon::join(|| copy(right.as_raw(), right_ptr), || copy(left.as_raw(), left_ptr));
        Ok(())
    }
}

/// The network's `[.., padded_height, padded_width]` output cropped back to the
/// image, still on the device (fp32, `[height, width]`). `None` when the output
/// does not have one value per padded pixel.
pub fn crop_on_device(output: &Tensor, geometry: &InputGeometry) -> Result<Option<Tensor>, TchError> {
    if output.numel() != geometry.padded_len() {
        return Ok(None);
    }
    let plane =
        output.f_to_kind(Kind::Float)?.f_view([i64::from(geometry.padded_height), i64::from(geometry.padded_width)])?;
    let image = plane
        .f_narrow(0, i64::from(geometry.top_pad), i64::from(geometry.height))?
        .f_narrow(1, 0, i64::from(geometry.width))?
        .f_contiguous()?;
    Ok(Some(image))
}

/// [`crop_on_device`], then copied to the CPU (top row first).
pub fn cropped_output(output: &Tensor, geometry: &InputGeometry) -> Result<Option<Vec<f32>>, TchError> {
    let Some(image) = crop_on_device(output, geometry)? else { return Ok(None) };
    Ok(Some(Vec::<f32>::try_from(&image.f_to_device(Device::Cpu)?.f_reshape([-1])?)?))
}

/// [`crop_on_device`], copied into the pinned `output` buffer: a direct DMA
/// copy (a pageable destination is staged through a driver buffer), which
/// waits for the device's stream, the one wait of a prediction.
pub fn cropped_output_pinned(
    output: &Tensor,
    geometry: &InputGeometry,
    pinned: &Tensor,
) -> Result<Option<Vec<f32>>, TchError> {
    let Some(image) = crop_on_device(output, geometry)? else { return Ok(None) };
    if pinned.size() != image.size() {
        return Err(TchError::Shape(format!("staging buffer {:?} does not fit {:?}", pinned.size(), image.size())));
    }
    pinned.shallow_clone().f_copy_(&image)?;
    Ok(Some(Vec::<f32>::try_from(&pinned.f_reshape([-1])?)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{crop, normalise_and_pad, PadRule};
    use image::Rgb;

    #[test]
    fn device_preprocessing_equals_the_reference_bit_for_bit() {
        let normaliser = Normaliser::new(Device::Cpu).unwrap();
        for (w, h) in [(37, 21), (256, 256), (300, 250), (1, 1)] {
            let image = Rgb32FImage::from_fn(w, h, |x, y| {
                Rgb([(x * 7 % 256) as f32 / 255.0, (y * 13 % 256) as f32 / 255.0, ((x + y) % 256) as f32 / 255.0])
            });
            let geometry = PadRule::PSMNET.geometry(w, h);
            let tensor = normaliser.input(&image, &geometry).unwrap();
            let shape = [1, 3, i64::from(geometry.padded_height), i64::from(geometry.padded_width)];
            assert_eq!(tensor.size(), shape);
            let ours = Vec::<f32>::try_from(&tensor.reshape([-1])).unwrap();
            let reference = normalise_and_pad(&image, &geometry);
            assert!(ours.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{w}x{h} differs");
        }
    }

    #[test]
    fn device_crop_equals_the_reference() {
        let geometry = PadRule::PSMNET.geometry(300, 250);
        let padded: Vec<f32> = (0..geometry.padded_len()).map(|i| i as f32 * 0.25).collect();
        let output =
            Tensor::from_slice(&padded).view([1, i64::from(geometry.padded_height), i64::from(geometry.padded_width)]);
        assert_eq!(cropped_output(&output, &geometry).unwrap().unwrap(), crop(&padded, &geometry));
        let wrong = Tensor::from_slice(&padded[..100]);
        assert_eq!(cropped_output(&wrong, &geometry).unwrap(), None);
    }
}
