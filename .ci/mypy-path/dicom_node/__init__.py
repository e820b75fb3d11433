"""mypy's view of the installed package layout (pyproject.toml [tool.mypy] mypy_path).

setuptools installs engine/ as dicom_node.engine and train/ as dicom_node.train (package-dir in
pyproject.toml); mypy has no such mapping.  The two symlinks beside this file give it one, so
the node's imports of dicom_node.engine/train resolve to the real, typed source.
"""
