"""The diffusion backbone: offline tokenizer, pipeline builders/loaders, sampling core, the font
corpus and the pretraining recipe of the builtin backbone, and the oracle that judges it.

Others build on: `backbone.build_pipeline / save_pipeline / load_pipeline / resolve_base_model`,
`sampling.sample / set_attention / make_scheduler / encode_prompts`, `prompts.group_prompt(s)`,
`oracle.load_oracle / predict`.
"""
