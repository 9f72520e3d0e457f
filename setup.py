"""The one thing pyproject.toml cannot say: the own int8 kernel, a C extension that may fail to build.

`optional=True`: without a C compiler (or OpenMP) the install still succeeds, with a warning, and the int8
mode runs on fbgemm (service/inference/int8kernel.py says why and when each is used).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "service.inference._int8", ["service/inference/_int8.c"],
    # -fopenmp links libgomp.so.1: at run time that is the copy torch already loaded (same soname), so the
    # kernel and torch share one OpenMP runtime and one team of threads.
    extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"], optional=True)])
