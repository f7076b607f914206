"""PrAd core: model loading, our forward pass, adapter variants, sampling, reference generation."""
