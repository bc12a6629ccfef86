"""Checking an output against its checkpoint: byte comparison (`verification`) and the output record's
fingerprints and options (`provenance`).
"""
