"""Realserver: holds VIPs on loopback and DNATs VIP:port to local pods with one owned nftables table.

Not implemented yet: this package reserves the role's place in the layout (see the issues).
"""
