"""The applications, built only from the public API of the core (``rdl_functional``): the disc experiment of the
seed report (:mod:`~rdl_functional.apps.disc`), the ``rdl-train`` command line (:mod:`~rdl_functional.apps.cli`),
the pictures (:mod:`~rdl_functional.apps.plots`) and the torch.nn twins the experiment is compared with
(:mod:`~rdl_functional.apps.torch_baseline`). The core imports nothing from here.
"""
