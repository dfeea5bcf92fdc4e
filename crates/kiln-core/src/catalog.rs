//! The routes kiln serves: the hosted API's model ids, each a fixed input schema (in `kiln-api`)
//! and a model family whose engine runs it.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One model id of the hosted API. The set is closed: adding a route means adding its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Route {
    /// `blackforestlabs/flux-1-1-pro/text-to-image`, served by a FLUX.1-family checkpoint.
    Flux11ProTextToImage,
    /// `blackforestlabs/flux-2/flex/text-to-image`, served by a FLUX.2 checkpoint.
    Flux2FlexTextToImage,
    /// `blackforestlabs/flux-2/flex/edit`: FLUX.2 [flex] conditioned on reference images, served
    /// by the same FLUX.2 checkpoint as the text-to-image route.
    Flux2FlexEdit,
}

/// The output sizes a route accepts: sides that are multiples of `step` from `min` to `max`,
/// at most `max_pixels` in all. The routes' schemas (in `kiln-api`) check requests against
/// these, and an engine keeps a size it derives itself (an edit's `image_size: "auto"`) within
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideBounds {
    pub step: u32,
    pub min: u32,
    pub max: u32,
    pub max_pixels: u64,
}

/// FLUX.2 [flex]'s sizes (text-to-image and edit): multiples of 16 (the latent patch), 64 to
/// 2048 a side, at most 4 MP.
pub const FLUX2_SIDES: SideBounds = SideBounds {
    step: 16,
    min: 64,
    max: 2048,
    max_pixels: 4_000_000,
};

impl SideBounds {
    /// `(width, height)` brought within these bounds, its aspect ratio kept where it can be:
    /// scaled down until the longer side and the area fit, or up until the shorter side does
    /// (unless the longer would then pass the maximum); then each side cut to a multiple of
    /// `step` and kept within `min..=max` (an aspect ratio beyond `max / min` is clamped).
    pub fn fit(&self, width: u32, height: u32) -> (u32, u32) {
        let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
        let (shorter, longer) = (w.min(h), w.max(h));
        let ceiling = (f64::from(self.max) / longer).min((self.max_pixels as f64 / (w * h)).sqrt());
        let scale = if shorter < f64::from(self.min) {
            (f64::from(self.min) / shorter).min(ceiling)
        } else {
            ceiling.min(1.0)
        };
        let side = |s: f64| {
            let cut = ((s * scale) as u32) / self.step * self.step;
            cut.clamp(self.min, self.max)
        };
        (side(w), side(h))
    }
}

/// Which engine family runs a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    Flux1,
    Flux2,
}

impl Route {
    pub const ALL: [Route; 3] = [
        Route::Flux11ProTextToImage,
        Route::Flux2FlexTextToImage,
        Route::Flux2FlexEdit,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Route::Flux11ProTextToImage => "blackforestlabs/flux-1-1-pro/text-to-image",
            Route::Flux2FlexTextToImage => "blackforestlabs/flux-2/flex/text-to-image",
            Route::Flux2FlexEdit => "blackforestlabs/flux-2/flex/edit",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Route::Flux11ProTextToImage => "FLUX 1.1 [pro] text-to-image",
            Route::Flux2FlexTextToImage => "FLUX.2 [flex] text-to-image",
            Route::Flux2FlexEdit => "FLUX.2 [flex] edit",
        }
    }

    /// Whether the route's input has reference images (`image_urls`), so that only an engine
    /// that conditions on images can serve it.
    pub fn takes_reference_images(self) -> bool {
        matches!(self, Route::Flux2FlexEdit)
    }

    pub fn family(self) -> ModelFamily {
        match self {
            Route::Flux11ProTextToImage => ModelFamily::Flux1,
            Route::Flux2FlexTextToImage | Route::Flux2FlexEdit => ModelFamily::Flux2,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown model_id '{given}'; this server has: {}", Route::ALL.map(Route::id).join(", "))]
pub struct UnknownRoute {
    pub given: String,
}

impl FromStr for Route {
    type Err = UnknownRoute;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Route::ALL
            .into_iter()
            .find(|r| r.id() == s)
            .ok_or_else(|| UnknownRoute {
                given: s.chars().take(200).collect(),
            })
    }
}

impl TryFrom<String> for Route {
    type Error = UnknownRoute;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Route> for String {
    fn from(r: Route) -> String {
        r.id().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_back() {
        for r in Route::ALL {
            assert_eq!(r.id().parse::<Route>().unwrap(), r);
        }
        let err = "flux/nope".parse::<Route>().unwrap_err().to_string();
        assert!(
            err.contains("blackforestlabs/flux-2/flex/text-to-image"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    #[test]
    fn derived_sizes_are_brought_within_the_routes_bounds() {
        let fit = |w, h| FLUX2_SIDES.fit(w, h);
        assert_eq!(fit(1024, 768), (1024, 768), "within bounds: unchanged");
        assert_eq!(fit(1000, 750), (992, 736), "cut to multiples of 16");
        assert_eq!(
            fit(4096, 16),
            (2048, 64),
            "too long: scaled, the short side raised"
        );
        assert_eq!(fit(16, 4096), (64, 2048));
        assert_eq!(
            fit(4096, 2048),
            (2048, 1024),
            "the longer side scaled to the maximum"
        );
        assert_eq!(fit(3000, 3000), (2000, 2000), "4 MP at most");
        assert_eq!(fit(8, 8), (64, 64), "too small: raised to the minimum");
        assert_eq!(fit(68, 48), (80, 64), "the aspect ratio kept while raising");
        for (w, h) in [
            (4096, 16),
            (3000, 3000),
            (1, 1),
            (2047, 2047),
            (u32::MAX, 1),
        ] {
            let (fw, fh) = fit(w, h);
            assert!(
                (64..=2048).contains(&fw) && (64..=2048).contains(&fh),
                "{w}x{h}"
            );
            assert!(u64::from(fw) * u64::from(fh) <= 4_000_000, "{w}x{h}");
            assert_eq!((fw % 16, fh % 16), (0, 0), "{w}x{h}");
        }
    }
}
