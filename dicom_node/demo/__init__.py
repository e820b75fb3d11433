"""Synthetic demo data (``dicom-node demo-data``): not part of the running node.

- :mod:`.phantoms`: procedural radiograph anatomy rendered with Beer-Lambert;
- :mod:`.vendor_processing`: synthetic vendor post-processing (the two "styles" of a pair);
- :mod:`.writer`: the DICOM CR files, paired or unpaired, and their manifest.

See docs/demo-data.md.
"""
