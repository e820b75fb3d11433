"""Synthetic demo data (``dicom-node demo-data``): not part of the running node.

- :mod:`.phantoms`: procedural radiograph anatomy rendered with Beer-Lambert;
- :mod:`.vendor_processing`: synthetic vendor post-processing (the two "styles" of a pair) and
  the registry of style pairs;
- :mod:`.nonlinear_styles`: nonlinear processing on absolute values (multiscale, CLAHE,
  bilateral, limited unsharp masking) and its pairs; :mod:`.tone`: the tone curves both share;
- :mod:`.real_crops`: crops of varying field of view of real CR radiographs (pydicom-data);
- :mod:`.writer`: the DICOM CR files, paired or unpaired, and their manifest.

See docs/demo-data.md.
"""
