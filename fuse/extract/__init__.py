"""Extraction: each model's top-k next-token log-probs over the corpus, read with its own chat
template (`extract`), scored a batch at a time (`score`) and kept in a resumable logit store (`store`)."""
