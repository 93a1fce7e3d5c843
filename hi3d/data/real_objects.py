"""Real meshes made by others that the demo, tests and benchmarks use (Debian packages that
scripts/bootstrap.sh installs): name -> (path, package)."""

from __future__ import annotations

from pathlib import Path

from hi3d.errors import Hi3DError

REAL_OBJECTS = {
    "bunny": ("/usr/share/glmark2/models/bunny.obj", "glmark2-data"),  # Stanford bunny
    "spider": ("/usr/share/assimp/models/OBJ/spider.obj", "assimp-testmodels"),  # textured OBJ+MTL
    "wuson": ("/usr/share/assimp/models/PLY/Wuson.ply", "assimp-testmodels"),
    "duck": ("/usr/share/assimp/models/Collada/duck.dae", "assimp-testmodels"),  # COLLADA sample duck
    "engine": ("/usr/share/assimp/models/glTF2/2CylinderEngine-glTF-Binary/2CylinderEngine.glb",
               "assimp-testmodels"),
}


def resolve_object(name: str) -> Path:
    """A known object name (``REAL_OBJECTS``) or a mesh path; a clear error naming the package to install."""
    if name in REAL_OBJECTS:
        path, package = REAL_OBJECTS[name]
        if not Path(path).is_file():
            raise Hi3DError(f"the {name} mesh ({path}) is missing: install it with 'apt-get install {package}', "
                            "or pass a path to a mesh file")
        return Path(path)
    path = Path(name)
    if not path.is_file():
        raise Hi3DError(f"'{name}' is neither one of {', '.join(REAL_OBJECTS)} nor a mesh file")
    return path
