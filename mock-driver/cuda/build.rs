//! Gives the mock the soname of the library it stands in for, so `dlopen("libcuda.so.1")` and the
//! interposer's own load of the driver resolve to one loaded object.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
}
