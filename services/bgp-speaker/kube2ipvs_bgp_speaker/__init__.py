"""BGP speaker: announces VIP routes through gobgpd's gRPC API, gated on local director health.

Not implemented yet: this package reserves the role's place in the layout (see the issues).
"""
