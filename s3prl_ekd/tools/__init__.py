"""Tools around a trained student: the step benchmark and the SUPERB submission export."""
