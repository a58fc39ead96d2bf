"""Fixtures and helpers shared by the tests.

Plugin modules (loaded by tests/conftest.py, their fixtures need no import):
  tiers       the fast tier's guards (unit and engine tests start no server)
  asserts     short explanations for == of large byte strings
  processes   process_guard, stop_at_teardown; pid_alive, terminate_pid
  devices     loop_device (a loop device over a sparse file)
  cli         state_dir, clonectl; run_clonectl, status_json, snapshot_tree
  servers     server_factory, server, served_lu, shared_server, fresh_lu
  nbdclient   nbd_connect
  clonelib    clone_env (a Source LU and its clones on a running server)
  sessionlib  dests, session_env (destination NBD servers, sessions)
  iscsilib    iscsi_server (serve --iscsi-portal)
  netlib      cluster (servers in network namespaces, for replication),
              netlab (namespaces of scripts/netns.py, always removed)
  twonodes    two_nodes (in-process nodes A and B of one replicated group
              of v1 and v2; its Node and converge)
  guestlib    guest (a booted QEMU guest; guestimage builds its image)
Helper modules: sockets, models, tools (qemu-io, whole-export reads),
rsgmodel (replication's change model), rsgnodes (in-process replication
nodes: Node, a primary/secondary Pair, their factory fixtures), rsgpair
(the DCM replay tests' pair), sessionfakes (a session engine on memory
backends: FakeLU, marked_session), powerloss (a simulated disk that
loses unsynced writes), clonegroup and clonemodel (a clone group on memory
backends, failing ones too, and its hypothesis model), spybackend (a memory backend that
records what was done to it), guestimage, relay (a TCP relay that
records every byte), tlscerts (a CA and certificates).
"""
