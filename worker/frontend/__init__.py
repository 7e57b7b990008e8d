"""CosyVoice3 frontend: text -> token ids (:mod:`.tokenizer`), text normalisation and sentence
splitting (:mod:`.text`), prompt audio loading, resampling and features (:mod:`.audio`).

Submodules are imported on demand so that, e.g., the tokenizer does not pull in soundfile.
"""
