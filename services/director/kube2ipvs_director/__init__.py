"""Director: programs kernel IPVS (direct routing to nodes, weighted by ready pods per node) and
attracts VIP traffic by gratuitous ARP.

Not implemented yet: this package reserves the role's place in the layout (see the issues).
"""
