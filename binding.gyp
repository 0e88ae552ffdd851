{
  "targets": [
    {
      "target_name": "lockmgr",
      "sources": [
        "native/addon.cc",
        "native/ofd.cc",
        "native/waiters.cc",
        "native/spawn.cc",
        "native/sanlock.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": [
        "NAPI_VERSION=8",
        "NAPI_DISABLE_CPP_EXCEPTIONS",
        "NODE_ADDON_API_DISABLE_DEPRECATED",
        "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS",
        "_GNU_SOURCE"
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17", "-std=gnu++20"],
      "cflags": ["-Wall", "-Wextra", "-Werror", "-fno-exceptions"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-fno-exceptions"],
      "ldflags": ["-pthread", "-Wl,-z,now"],
      "libraries": ["-lrt", "-ldl"],
      "conditions": [
        ["OS!='linux'", { "type": "none" }]
      ]
    },
    {
      "target_name": "lockmgr-sanlock-exec",
      "type": "executable",
      "sources": ["native/sanlock-exec.c"],
      "cflags": ["-Wall", "-Wextra", "-Werror"],
      "libraries": ["-ldl"],
      "conditions": [
        ["OS!='linux'", { "type": "none" }]
      ]
    }
  ]
}
