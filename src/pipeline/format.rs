//! The answer formats: the one list from which the query's accepted values,
//! the metrics labels, `/api/v1/model`, the error text and the OpenAPI enum
//! are all derived.

use serde::Deserialize;

/// What the client wants back.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// JSON with statistics, timings and base64 PNGs.
    #[default]
    Json,
    /// KITTI 16-bit PNG, `round(d * 256)`.
    Png16,
    /// 8-bit colourised PNG (turbo).
    Color,
    /// float32 Middlebury PFM.
    Pfm,
    /// Depth as float32 PFM in the calibration's units (+inf = none); needs a calibration.
    Depth,
    /// Depth as a 16-bit PNG in millimetres (0 = none); needs a calibration.
    Depth16,
    /// Coloured point cloud, binary PLY, left camera frame; needs a calibration.
    Ply,
    /// Standard deviation of the disparity (px) as float32 PFM: how far to trust each pixel.
    Uncertainty,
    /// Standard deviation of the depth, `Z^2 / (f B) * sigma`, as float32 PFM in the
    /// calibration's units (+inf = no depth); needs a calibration.
    #[serde(rename = "depth_uncertainty")]
    DepthUncertainty,
}

impl OutputFormat {
    /// Every format, in the order the documentation lists them.
    pub const ALL: [OutputFormat; 9] = [
        OutputFormat::Json,
        OutputFormat::Png16,
        OutputFormat::Color,
        OutputFormat::Pfm,
        OutputFormat::Uncertainty,
        OutputFormat::Depth,
        OutputFormat::Depth16,
        OutputFormat::Ply,
        OutputFormat::DepthUncertainty,
    ];

    /// The format's name in queries, metrics labels and messages.
    pub fn label(self) -> &'static str {
        match self {
            OutputFormat::Json => "json",
            OutputFormat::Png16 => "png16",
            OutputFormat::Color => "color",
            OutputFormat::Pfm => "pfm",
            OutputFormat::Depth => "depth",
            OutputFormat::Depth16 => "depth16",
            OutputFormat::Ply => "ply",
            OutputFormat::Uncertainty => "uncertainty",
            OutputFormat::DepthUncertainty => "depth_uncertainty",
        }
    }

    /// The format whose label is `name`.
    pub fn from_label(name: &str) -> Option<OutputFormat> {
        OutputFormat::ALL.into_iter().find(|f| f.label() == name)
    }

    /// Whether the format needs a calibration (depth and points).
    pub fn needs_calibration(self) -> bool {
        matches!(self, OutputFormat::Depth | OutputFormat::Depth16 | OutputFormat::Ply | OutputFormat::DepthUncertainty)
    }

    /// Whether the answer itself carries the disparity's deviation (the JSON
    /// answer always does: its statistics and image).
    pub fn carries_uncertainty(self) -> bool {
        matches!(self, OutputFormat::Json | OutputFormat::Uncertainty | OutputFormat::DepthUncertainty)
    }

    /// Whether the answer needs the depth map (not a raw disparity file).
    pub fn carries_depth(self) -> bool {
        self == OutputFormat::Json || self.needs_calibration()
    }

    /// The file extension of the answer's bytes (what `batch` names its files with).
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Json => "json",
            OutputFormat::Png16 | OutputFormat::Color | OutputFormat::Depth16 => "png",
            OutputFormat::Pfm | OutputFormat::Depth | OutputFormat::Uncertainty | OutputFormat::DepthUncertainty => {
                "pfm"
            }
            OutputFormat::Ply => "ply",
        }
    }

    /// The labels of the formats that need (or do not need) a calibration.
    pub fn labels(with_calibration: bool) -> Vec<&'static str> {
        OutputFormat::ALL.iter().filter(|f| f.needs_calibration() == with_calibration).map(|f| f.label()).collect()
    }

    /// Every label, separated by `|`, for error messages.
    pub fn choices() -> String {
        OutputFormat::ALL.map(OutputFormat::label).join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_round_trips_through_its_label_and_serde() {
        for format in OutputFormat::ALL {
            assert_eq!(OutputFormat::from_label(format.label()), Some(format));
            let parsed: OutputFormat = serde_json::from_value(serde_json::json!(format.label())).unwrap();
            assert_eq!(parsed, format, "serde and label() agree for {format:?}");
        }
        assert_eq!(OutputFormat::from_label("gif"), None);
        let mut labels: Vec<_> = OutputFormat::ALL.map(OutputFormat::label).to_vec();
        labels.dedup();
        assert_eq!(labels.len(), OutputFormat::ALL.len());
    }

    #[test]
    fn calibration_splits_the_list_in_two() {
        assert_eq!(OutputFormat::labels(true), ["depth", "depth16", "ply", "depth_uncertainty"]);
        assert_eq!(OutputFormat::labels(false), ["json", "png16", "color", "pfm", "uncertainty"]);
        assert!(OutputFormat::choices().starts_with("json|png16|"));
    }
}
