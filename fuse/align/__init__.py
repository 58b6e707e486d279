"""Alignment of a source onto the pivot: token surface forms (`surface`), FuseLLM's MinED token
alignment (`mined`, its window DP in `dp`), the two renderings of one chat aligned reply by reply
(`chat`), the vocabulary map (`vocab`) and its coverage (`coverage`), built resumably over a corpus
(`build`)."""
