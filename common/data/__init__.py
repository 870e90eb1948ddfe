"""Loading site data and splitting it across sites: array datasets (images) and ratings."""
