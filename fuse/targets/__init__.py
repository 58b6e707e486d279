"""Fusion targets: which source position pairs with each pivot position (`pairing`), the source's
distribution carried onto pivot tokens (`translate`), the fusion functions MinCE / AvgCE
(`fusion`), and the training rows built from two logit stores (`rows`)."""
