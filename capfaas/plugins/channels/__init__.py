"""The built-in capability-passing channels: CAP_Calls, CAP_Files and CAP_Streams, one plugin each."""
