"""Fusion targets: which source position pairs with each pivot position (`pairing`), the source's
distribution carried onto pivot tokens (`translate`), the fusion functions MinCE / AvgCE
(`fusion`; over the pivot and K sources at once, FuseLLM mode: `fusion_multi`), and the training
rows built from two logit stores (`rows`; from the pivot's and K sources' stores: `rows_multi`)."""
