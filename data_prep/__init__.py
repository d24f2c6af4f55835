"""ImageNet-layout folders -> training-ready WebDataset shards and FFCV .beton files.

Modules (one responsibility each):

* :mod:`data_prep.layout` - discover ILSVRC2012 / ImageFolder layouts and labels (sorted-wnid class index);
* :mod:`data_prep.images` - open, validate, convert (CMYK, grayscale, PNG-as-JPEG), draft-mode downscale;
* :mod:`data_prep.sharding` - deterministic split into shard tasks;
* :mod:`data_prep.tasks` - run tasks in a local process pool or as a submitit/SLURM job array;
* :mod:`data_prep.write_webdataset`, :mod:`data_prep.write_ffcv` - the writers (atomic, resumable);
* :mod:`data_prep.manifest`, :mod:`data_prep.atomic` - manifests and atomic file output;
* :mod:`data_prep.verify` - re-read outputs, check counts and checksums;
* :mod:`data_prep.demo_dataset` - a small synthetic ImageNet-layout dataset.

CLI: ``python -m data_prep {make_demo_dataset,wds,ffcv,verify} ...`` (see ``data_prep/__main__.py``).
"""
