"""Pictures of masks: PNG reports of a run (`report`, `overlay`) and neuroglancer (`view`)."""
