"""BGP speaker: announces VIP routes through gobgpd's gRPC API, gated on local director health.

plan.py (pure model and planner), errors.py (gobgpd's error kinds), gobgp.py (the gRPC adapter),
fake.py (a strict in-memory gobgpd), app.py (the loop), main.py (`kube2ipvs bgp-speaker`),
genproto.py (build-time generation of gobgpd's API modules). See ../README.md.
"""
