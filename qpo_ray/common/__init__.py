"""What every part uses and that knows nothing of QPO: atomic files, JSON Lines, the one
device helper, progress lines, model provisioning, starting Ray, the run directory's file
layout, and the crash-test fault points."""
