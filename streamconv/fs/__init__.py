"""Operating-system primitives below everything that touches files: opening input files as regular files
only (`infiles`), creating output files without following planted links (`outfiles`), which fast IO paths
a run uses (`fastpaths`), and paths as identities plus the one routine that deletes a tree (`paths`).
"""
