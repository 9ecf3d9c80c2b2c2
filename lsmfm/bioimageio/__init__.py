"""bioimage.io model packages of finetuned lsmfm models (`lsmfm export --format bioimageio`); needs the
bioimageio extra. `package.py` builds them, `network.py` is the architecture file packed into each."""
