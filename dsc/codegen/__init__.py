"""Code generation: lowers pass-rewritten graphs into Plan programs, choosing kernels per node."""
