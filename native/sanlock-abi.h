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
