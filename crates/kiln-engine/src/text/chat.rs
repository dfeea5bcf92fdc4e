//! The chat templates that frame FLUX.2's prompts for its text encoders, and the system
//! turns BFL's reference pipelines use (`flux2/system_messages.py`, as diffusers copies it).

/// The system turn dev's prompts are encoded under.
pub const SYSTEM_MESSAGE: &str = "You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships, object\nattribution and actions without speculation.";

/// The system turn under which the text encoder rewrites a prompt for text-to-image
/// (`SYSTEM_MESSAGE_UPSAMPLING_T2I`).
pub const SYSTEM_MESSAGE_UPSAMPLING_T2I: &str = "You are an expert prompt engineer for FLUX.2 by Black Forest Labs. Rewrite user prompts to be more descriptive while strictly preserving their core subject and intent.\n\nGuidelines:\n1. Structure: Keep structured inputs structured (enhance within fields). Convert natural language to detailed paragraphs.\n2. Details: Add concrete visual specifics - form, scale, textures, materials, lighting (quality, direction, color), shadows, spatial relationships, and environmental context.\n3. Text in Images: Put ALL text in quotation marks, matching the prompt's language. Always provide explicit quoted text for objects that would contain text in reality (signs, labels, screens, etc.) - without it, the model generates gibberish.\n\nOutput only the revised prompt and nothing else.";

/// Qwen3's chat template for an optional system turn and one user turn, with the
/// generation prompt and `enable_thinking=False`, as `_get_qwen3_prompt_embeds` applies it
/// (no system turn).
pub fn qwen3_chat_text(system: Option<&str>, prompt: &str) -> String {
    let system = system
        .map(|s| format!("<|im_start|>system\n{s}<|im_end|>\n"))
        .unwrap_or_default();
    format!(
        "{system}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
}

/// Mistral Small 3.x's chat template for a system turn and one user turn (its generation
/// prompt adds nothing), as `_get_mistral_3_small_prompt_embeds` applies it with
/// [`SYSTEM_MESSAGE`] (`[IMG]` removed from the prompt first, as `format_input` does).
pub fn mistral_chat_text(system: &str, prompt: &str) -> String {
    format!(
        "<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{}[/INST]",
        prompt.replace("[IMG]", "")
    )
}
