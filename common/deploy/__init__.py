"""Deployment: the federation key, certificates and node keys, secret files, a site's own config."""
