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
