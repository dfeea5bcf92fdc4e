//! Text: the encoders each family conditions on (CLIP and T5 for FLUX.1, a decoder-only
//! language model for FLUX.2), their tokenizers, and the chat templates that frame FLUX.2's
//! prompts.

pub mod chat;
pub(crate) mod clip;
pub(crate) mod lm;
pub(crate) mod t5;
pub(crate) mod tokenizer;
