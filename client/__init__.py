"""What runs at a partner site: the Flower ClientApp and local DP training."""
