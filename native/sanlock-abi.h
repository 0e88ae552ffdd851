// The parts of sanlock's client ABI that lockmgr uses, copied from sanlock
// 3.8's public headers (sanlock.h, sanlock_resource.h, sanlock_admin.h,
// sanlock_rv.h). A copy rather than an #include: the addon must build, load
// and work on machines without libsanlock-dev, and libsanlock_client.so.1 is
// loaded with dlopen at run time only when a sanlock lockspace is used. These
// structs and constants are sanlock's stable ABI (the library's soname has
// been .so.1 since 2011).
#pragma once

#include <stdint.h>

#define LOCKMGR_SANLOCK_LIB "libsanlock_client.so.1"

// sanlock_rv.h: the return codes of sanlock's own (the rest are -errno).
#define LOCKMGR_SANLK_CODES(X)                                                                       \
  X(SANLK_ERROR, -201) X(SANLK_AIO_TIMEOUT, -202) X(SANLK_WD_ERROR, -203)                           \
  X(SANLK_DBLOCK_READ, -210) X(SANLK_DBLOCK_WRITE, -211) X(SANLK_DBLOCK_LVER, -212)                 \
  X(SANLK_DBLOCK_MBAL, -213) X(SANLK_DBLOCK_CHECKSUM, -214)                                         \
  X(SANLK_LEADER_READ, -220) X(SANLK_LEADER_WRITE, -221) X(SANLK_LEADER_DIFF, -222)                 \
  X(SANLK_LEADER_MAGIC, -223) X(SANLK_LEADER_VERSION, -224) X(SANLK_LEADER_SECTORSIZE, -225)        \
  X(SANLK_LEADER_LOCKSPACE, -226) X(SANLK_LEADER_RESOURCE, -227) X(SANLK_LEADER_NUMHOSTS, -228)     \
  X(SANLK_LEADER_CHECKSUM, -229)                                                                    \
  X(SANLK_ADDLS_INVALID_HOSTID, -231)                                                               \
  X(SANLK_ACQUIRE_LVER, -240) X(SANLK_ACQUIRE_LOCKSPACE, -241) X(SANLK_ACQUIRE_IDDISK, -242)        \
  X(SANLK_ACQUIRE_IDLIVE, -243) X(SANLK_ACQUIRE_OWNED, -244) X(SANLK_ACQUIRE_OTHER, -245)           \
  X(SANLK_ACQUIRE_SHRETRY, -246) X(SANLK_HOSTID_BUSY, -262)

#define SANLK_NAME_LEN 48
#define SANLK_PATH_LEN 1024

struct sanlk_disk {
  char path[SANLK_PATH_LEN];
  uint64_t offset;
  uint32_t pad1;
  uint32_t pad2;
};

#define SANLK_RES_LVER 0x00000001
#define SANLK_RES_SHARED 0x00000004

struct sanlk_resource {
  char lockspace_name[SANLK_NAME_LEN];
  char name[SANLK_NAME_LEN];
  uint64_t lver;
  uint64_t data64;
  uint32_t data32;
  uint32_t unused;
  uint32_t flags;
  uint32_t num_disks;
  struct sanlk_disk disks[1];  // [0] in sanlock.h; we always pass exactly one disk
};

struct sanlk_rindex {
  uint32_t flags;
  uint32_t max_resources;
  uint64_t unused;
  char lockspace_name[SANLK_NAME_LEN];
  struct sanlk_disk disk;
};

struct sanlk_rentry {
  char name[SANLK_NAME_LEN];
  uint64_t offset;
  uint32_t flags;
  uint32_t unused;
};

struct sanlk_lockspace {
  char name[SANLK_NAME_LEN];
  uint64_t host_id;
  uint32_t flags;
  struct sanlk_disk host_id_disk;
};

struct sanlk_host {
  uint64_t host_id;
  uint64_t generation;
  uint64_t timestamp;
  uint32_t io_timeout;
  uint32_t flags;
};

#define SANLK_RESTRICT_ALL 0x00000001
#define SANLK_RESTRICT_SIGTERM 0x00000004

#define SANLK_REL_ALL 0x00000001
#define SANLK_INQ_WAIT 0x00000001
